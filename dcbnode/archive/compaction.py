"""Compaction: rewriting a volume without its dead records, crash-safe at every step.

Compaction rewrites a volume that holds dead records (superseded or tombstoned) into a new
*generation* of the same volume: ``<hash>.dcbs`` → ``<hash>.g2.dcbs`` → ``<hash>.g3.dcbs`` … The new
file keeps the old file's volume id, which is how :mod:`.recovery` recognises the two files of an
interrupted compaction (the one the index points to wins).  Steps, each crash-safe:

1. take the old volume's ``flock`` (appenders wait), copy the dictionary record (which the instance
   records of the volume name by id) and then every live record verbatim into a hidden temporary file,
   ``fsync`` it (a crash leaves only a ``.*.tmp`` that recovery deletes) — :mod:`dcbnode.dcbs.generation`
   writes the bytes;
2. link it into place under the new generation name, ``fsync`` the directory (a crash leaves two
   generations, the index points to the old one: recovery removes the new one);
3. one index transaction moves every instance row to the new path and offsets and drops the old
   volume row (a crash after it leaves the old file unreferenced: recovery removes it);
4. unlink the old file and ``fsync`` the directory.  Readers that already hold the old file open keep
   reading its (unchanged) inode until they close it.

A volume whose records hold raw frames (the node deferred their compression) is compacted even with no
dead record: its records are *re-encoded* rather than copied (frames compressed as an inline store
would have, each verified lossless; metadata written against a dictionary made from the first live
record), and the same index transaction clears its ``pending_compression`` mark.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ..dcbs import (
    DcbsError,
    StoredInstance,
    Volume,
    live_instances,
)
from ..dcbs.format import RecordKind
from ..dcbs.generation import write_generation, write_reencoded_generation
from ..dcbs.instance import has_raw_frames
from ..dcbs.volume import RecordLocation, fsync_directory
from ..index.models import Instance, VolumeRow
from ..index.writer import clear_compression_pending, volume_row
from .archive import Archive, volume_generation, volume_stem
from .recovery import resolve_generations, volume_files
from .rewrite_lock import rewriting


def _next_generation_path(path: Path) -> Path:
    stem = volume_stem(path.name)
    taken = [volume_generation(p.name) for p in path.parent.glob(f"{stem}*.dcbs") if volume_stem(p.name) == stem]
    return path.with_name(f"{stem}.g{max([volume_generation(path.name), *taken]) + 1}.dcbs")


@dataclass
class CompactResult:
    """What compaction did to one volume."""

    volume: str
    new_volume: str | None
    records_before: int
    live_records: int
    bytes_before: int
    bytes_after: int


def needs_compaction(path: Path) -> bool:
    """Whether a volume holds a dead record or raw frames, found without reading frame data (dictionary
    records, shared by the instance records and never dead while any is live, are not counted)."""
    with Volume.open(path) as volume:
        records = sum(1 for entry in volume.records() if entry.header.kind != RecordKind.DICTIONARY)
        live = live_instances(volume)
        return records != len(live) or any(has_raw_frames(stored.meta) for stored in live.values())


def compact_volume(archive: Archive, path: Path, *, pause: Callable[[str], None] | None = None,
                   wait: bool = True) -> CompactResult | None:
    """Rewrite one volume without its dead records (see the module docstring); None if nothing to do,
    or if another compaction (the node's compressor, another ``dcbnode-admin compact``) replaced the
    volume first.

    Holds the data folder's rewrite lock (:mod:`.rewrite_lock`) throughout: while a backup copies the
    volumes this waits, or with ``wait=False`` raises :class:`~.rewrite_lock.RewritesPaused` at once.
    ``pause(step)`` is called between the steps (tests use it to crash at a chosen moment).
    """
    with rewriting(archive.data_dir, wait=wait):
        return _compact_volume(archive, path, pause)


def _compact_volume(archive: Archive, path: Path, pause: Callable[[str], None] | None) -> CompactResult | None:
    old_relative = archive.index_path(path)
    try:
        lock_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # replaced since it was listed
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # appenders to this volume wait until we are done
        if os.fstat(lock_fd).st_nlink == 0:
            return None  # replaced while we waited for the lock
        with Volume.open(path) as volume:
            entries = list(volume.records())
            dictionaries = [entry for entry in entries if entry.header.kind == RecordKind.DICTIONARY]
            entries = [entry for entry in entries if entry.header.kind != RecordKind.DICTIONARY]
            live = live_instances(volume)
            _drop_copies_filed_elsewhere(archive, old_relative, live)
            size_before = volume.size()
            reencode = any(has_raw_frames(stored.meta) for stored in live.values())
            if len(live) == len(entries) and not reencode:
                with archive.index.session() as session:  # e.g. compressed by another process meanwhile
                    clear_compression_pending(session, volume_stem(old_relative))
                archive.pending.unmarked(old_relative)
                return None
            old_offsets = {uid: s.location.offset for uid, s in live.items()}
            _check_index_agrees(archive, old_relative, old_offsets)
            target = _next_generation_path(path)
            records = list(live.values())
            new_locations = {} if not live else (write_reencoded_generation(volume, target, records, pause)
                                                 if reencode else write_generation(volume, target, dictionaries,
                                                                                   records, pause))
        if pause:
            pause("linked")
        new_relative = archive.index_path(target) if live else None
        try:
            with archive.index.session() as session:
                _move_rows(session, old_relative, new_relative, old_offsets, new_locations,
                           target.stat().st_size if live else 0)
        except SQLAlchemyError as exc:  # e.g. the index changed under us: undo step 2, keep the old file
            if live:
                target.unlink(missing_ok=True)
            problem = f"index update failed, volume left as it was ({type(exc).__name__}); retry"
            raise DcbsError(f"{path}: {problem}") from exc
        if pause:
            pause("committed")
        path.unlink()
        fsync_directory(path.parent)
        archive.pending.unmarked(old_relative)
    finally:
        os.close(lock_fd)  # releases the flock
    archive.volumes.forget(path)
    return CompactResult(old_relative, new_relative, len(entries), len(live), size_before,
                         target.stat().st_size if live else 0)


def _drop_copies_filed_elsewhere(archive: Archive, path: str, live: dict[str, StoredInstance]) -> None:
    """Forget the live records of instances the index has in another volume: copies that a replacement
    filed under another series superseded (a crash can come between the replacement's index commit and
    the tombstone it writes here), or duplicates a crash kept from being cut back.  Batched: the
    volume may hold thousands."""
    uids = list(live)
    for start in range(0, len(uids), 500):
        for uid, (volume_path, _) in archive.instance_locations(uids[start : start + 500]).items():
            if volume_path != path:
                del live[uid]


def _check_index_agrees(archive: Archive, path: str, live: dict[str, int]) -> None:
    with archive.index.session() as session:
        rows = dict(session.execute(select(Instance.sop_instance_uid, Instance.record_offset)
                                    .join(VolumeRow, Instance.volume).where(VolumeRow.path == path)).all())
    if rows != live:
        raise DcbsError(f"{archive.data_dir / path}: index and volume disagree; run 'dcbnode-admin verify' "
                        "and 'dcbnode-admin reindex' before compacting")


def _move_rows(session: Session, old: str, new: str | None, old_offsets: dict[str, int],
               locations: dict[str, RecordLocation], new_size: int) -> None:
    """Point every instance of volume ``old`` at its record in ``new``, drop ``old``'s row, and clear the
    volume's ``pending_compression`` mark (the new generation holds no raw frames).

    Only rows that still point at the record that was copied move (a concurrent "replace" may have
    re-filed an instance elsewhere meanwhile).
    """
    old_row = session.scalar(select(VolumeRow).where(VolumeRow.path == old))
    if new is not None and old_row is not None:
        new_row = volume_row(session, new)
        new_row.indexed_end = new_size
        for instance in session.scalars(select(Instance).where(Instance.volume_pk == old_row.id)):
            if old_offsets.get(instance.sop_instance_uid) == instance.record_offset:
                location = locations[instance.sop_instance_uid]
                instance.volume = new_row
                instance.record_offset = location.offset
                instance.record_length = instance.stored_bytes = location.length
        session.flush()
    if old_row is not None:
        session.delete(old_row)
    clear_compression_pending(session, volume_stem(old))
    session.flush()


def compactable_volumes(archive: Archive) -> list[Path]:
    """Volumes that hold at least one dead record or raw frames (after finishing any interrupted
    compaction)."""
    resolve_generations(archive)
    result = []
    for path in volume_files(archive):
        try:
            if needs_compaction(path):
                result.append(path)
        except DcbsError:
            continue  # damaged: verify reports it, compaction leaves it alone
    return result
