"""Compaction: rewriting a volume without its dead records, crash-safe at every step.

Compaction rewrites a volume that holds dead records (superseded or tombstoned) into a new
*generation* of the same volume: ``<hash>.dcbs`` → ``<hash>.g2.dcbs`` → ``<hash>.g3.dcbs`` … The new
file keeps the old file's volume id, which is how :mod:`.recovery` recognises the two files of an
interrupted compaction (the one the index points to wins).  Steps, each crash-safe:

1. take the old volume's ``flock`` (appenders wait), copy the dictionary record (which the instance
   records of the volume name by id) and then every live record verbatim into a hidden temporary file,
   ``fsync`` it (a crash leaves only a ``.*.tmp`` that recovery deletes);
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
import uuid
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
from ..dcbs.dictionary import SharedDictionary, read_dictionary, replacement_dictionary, unpack_dictionary
from ..dcbs.format import RECORD_HEADER_SIZE, MetaLayout, RecordHeader, RecordKind, crc32, pack_file_header
from ..dcbs.instance import EncodedInstance, has_raw_frames, reencoded
from ..dcbs.volume import RecordEntry, RecordLocation, fsync_directory
from ..index.models import Instance, VolumeRow
from ..index.writer import clear_compression_pending, volume_row
from .archive import Archive, volume_generation, volume_stem
from .recovery import resolve_generations, volume_files
from .rewrite_lock import rewriting

_COPY_CHUNK = 8 << 20


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
            write = _write_reencoded if reencode else _write_generation
            new_locations = write(volume, target, dictionaries, list(live.values()), pause) if live else {}
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


def _write_generation(volume: Volume, target: Path, dictionaries: list[RecordEntry], live: list[StoredInstance],
                      pause: Callable[[str], None] | None) -> dict[str, RecordLocation]:
    """Write the dictionary, then the live records, into ``target`` (same volume id); returns the new
    locations by UID.

    Records are copied byte for byte, except when the instance the dictionary was made from is no longer
    live: then the dictionary is made anew from the first live record, and the metadata of the records
    that used the old one is recompressed with it (their frames are still copied as they are), so that
    a deleted instance's header does not survive in the dictionary.
    """
    live = sorted(live, key=lambda s: s.location.offset)
    replacement = _replacement_dictionary(volume, dictionaries, live)

    def write_dictionaries(fd: int) -> int:
        if replacement is not None:
            _, new, block = replacement
            return _write_record(fd, RecordHeader(RecordKind.DICTIONARY, len(block), len(block), new.id), block)
        for entry in dictionaries:
            read_dictionary(volume, entry.location.offset)  # checked like every record copied
            _copy(volume, fd, entry.location)
        return sum(entry.location.length for entry in dictionaries)

    def write_record(fd: int, stored: StoredInstance) -> int:
        for _ in stored.iter_frames():  # never copy a damaged record into the new generation
            pass
        record_header, block = volume.read_meta(stored.location.offset)
        if replacement is not None and record_header.layout == MetaLayout.COMPACT \
                and record_header.dictionary_id == replacement[0].id:
            old, new, _ = replacement
            return _recompressed(volume, fd, stored.location, record_header, old.decompress(block), new)
        _copy(volume, fd, stored.location)
        return stored.location.length

    return _write_file(volume, target, live, write_dictionaries, write_record, pause)


def _write_reencoded(volume: Volume, target: Path, dictionaries: list[RecordEntry], live: list[StoredInstance],
                     pause: Callable[[str], None] | None) -> dict[str, RecordLocation]:
    """Write every live record of ``volume`` re-encoded (see :func:`~dcbnode.dcbs.instance.reencoded`) into
    ``target``, after a dictionary made from the first of them; returns the new locations by UID.

    At most two records are in memory at a time (the first, which the dictionary is made from, is kept
    until it is written).  Each is checked before it is written: its frames were verified lossless by
    the encoder, and its metadata must read back as it was (``EncodedInstance.record``).
    """
    live = sorted(live, key=lambda s: s.location.offset)
    first = [reencoded(live[0])]
    block = first[0].dictionary_candidate()
    dictionary = unpack_dictionary(block, crc32(block))

    def write_dictionary(fd: int) -> int:
        return _write_record(fd, RecordHeader(RecordKind.DICTIONARY, len(block), len(block), dictionary.id), block)

    def write_record(fd: int, stored: StoredInstance) -> int:
        encoded = first.pop() if first else reencoded(stored)
        return _write_encoded(fd, encoded, dictionary)

    return _write_file(volume, target, live, write_dictionary, write_record, pause)


def _write_file(volume: Volume, target: Path, live: list[StoredInstance], write_dictionaries: Callable[[int], int],
                write_record: Callable[[int, StoredInstance], int],
                pause: Callable[[str], None] | None) -> dict[str, RecordLocation]:
    """Create ``target`` (a new generation of ``volume``) durably: the file header, the dictionary records
    (``write_dictionaries(fd)`` returns the bytes it wrote), then each of ``live`` by
    ``write_record(fd, record)`` (likewise), into a hidden temporary file that is linked into place once
    fsynced.  Returns the new location of each record by UID; ``pause("copying")`` after each."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    locations: dict[str, RecordLocation] = {}
    try:
        header = pack_file_header(volume.volume_id)
        os.write(fd, header)
        position = len(header) + write_dictionaries(fd)
        for stored in live:
            length = write_record(fd, stored)
            locations[stored.meta.sop_instance_uid] = RecordLocation(position, length)
            position += length
            if pause:
                pause("copying")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if pause:
            pause("synced")
        os.link(temporary, target)  # fails rather than clobber an existing generation
        fsync_directory(target.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
    return locations


def _replacement_dictionary(
    volume: Volume, dictionaries: list[RecordEntry], live: list[StoredInstance]
) -> tuple[SharedDictionary, SharedDictionary, bytes] | None:
    """``(old, new, new's metadata block)`` when the volume's dictionary must be made anew from the first
    live record (the one it was made from is gone); None to keep it."""
    if len(dictionaries) != 1 or not live:
        return None
    old = read_dictionary(volume, dictionaries[0].location.offset)
    record_header, block = volume.read_meta(live[0].location.offset)
    if record_header.layout != MetaLayout.COMPACT or record_header.dictionary_id != old.id:
        return None
    content = old.decompress(block)
    if content == old.content:  # the dictionary's own instance is still the first live one
        return None
    return (old, *replacement_dictionary(old, content))


def _recompressed(volume: Volume, fd: int, location: RecordLocation, header: RecordHeader, content: bytes,
                  dictionary: SharedDictionary) -> int:
    """Write a COMPACT record with its metadata ``content`` compressed against ``dictionary`` and its frame
    data copied from ``location``; returns the bytes written."""
    block = dictionary.compress(content)  # checked to read back
    frames = header.payload_length - header.meta_length
    written = _write_record(fd, RecordHeader(RecordKind.INSTANCE, len(block) + frames, len(block), crc32(block),
                                             MetaLayout.COMPACT, dictionary.id), block)
    _copy(volume, fd, RecordLocation(location.offset + RECORD_HEADER_SIZE + header.meta_length, frames))
    return written + frames


def _write_encoded(fd: int, encoded: EncodedInstance, dictionary: SharedDictionary) -> int:
    """Write a COMPACT instance record of ``encoded`` using ``dictionary``; returns the bytes written."""
    block, frames = encoded.record(dictionary)  # checked to read back
    data_length = sum(len(frame) for frame in frames)
    written = _write_record(fd, RecordHeader(RecordKind.INSTANCE, len(block) + data_length, len(block),
                                             crc32(block), MetaLayout.COMPACT, dictionary.id), block)
    for frame in frames:
        _write_all(fd, frame)
    return written + data_length


def _write_record(fd: int, header: RecordHeader, meta: bytes) -> int:
    """Write a record header and its metadata block; returns the bytes written."""
    _write_all(fd, header.pack() + meta)
    return RECORD_HEADER_SIZE + len(meta)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(volume: Volume, fd: int, location: RecordLocation) -> None:
    """Append one record of ``volume`` to the file ``fd``, byte for byte."""
    start, length = location.offset, location.length
    for chunk_start in range(0, length, _COPY_CHUNK):
        _write_all(fd, volume.read_exact(start + chunk_start, min(_COPY_CHUNK, length - chunk_start)))


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
