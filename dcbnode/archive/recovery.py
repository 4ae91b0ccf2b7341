"""Bringing the index in line with the volumes: crash recovery and full reindex.

The volumes are the source of truth.  After a crash, a volume may end in a torn record (cut here)
or hold records that reached the disk but not the index (indexed here).  ``reindex`` rebuilds the
whole index from the volumes alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from ..dcbs import StoredInstance, Volume, live_instances
from ..dcbs.format import FILE_HEADER_SIZE, unpack_file_header
from ..dcbs.volume import fsync_directory
from ..index.models import VolumeRow
from ..index.writer import (
    advance_indexed_end,
    clear_all,
    instance_location,
)
from .archive import VOLUMES_DIR, Archive, volume_generation, volume_stem
from .catch_up import RecoveryReport, apply_record, archived_copy_followed, index_record
from .rewrite_lock import rewriting

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
#: records indexed per transaction during recovery and reindex
_BATCH = 500


def volume_files(archive: Archive) -> list[Path]:
    """Every volume file under the data directory, sorted (one file per volume once generations are resolved)."""
    return volume_files_in(archive.data_dir)


def volume_files_in(data_dir: Path) -> list[Path]:
    """Every volume file under ``data_dir``, sorted (no archive needed: backup and restore use it)."""
    return sorted(p for p in (data_dir / VOLUMES_DIR).rglob("*.dcbs") if not p.name.startswith("."))


def resolve_generations(archive: Archive, files: list[Path] | None = None) -> list[Path]:
    """Remove the losing file of a compaction interrupted by a crash; returns the files removed.

    Compaction writes ``<hash>.gN.dcbs`` with the *same volume id* as the file it replaces.  When two
    files of one directory share a volume id, the ones the index has a volume row for win; if the index
    knows none of them (after ``reindex`` cleared it), the lowest generation wins: it holds everything
    the newer one holds.  A file with a new volume id (a series volume recreated after compaction) is
    never touched.  ``files``: :func:`volume_files`, when the caller has listed them already.
    """
    # Generations of one volume share its stem (``<hash>``, ``<hash>.gN``): only a stem with several files
    # needs its headers read, which spares one open and read per volume (a disk seek each on a cold cache).
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for path in volume_files(archive) if files is None else files:
        by_stem.setdefault((path.parent, volume_stem(path.name)), []).append(path)
    groups: dict[tuple[Path, bytes], list[Path]] = {}
    for path in (path for paths in by_stem.values() if len(paths) > 1 for path in paths):
        try:
            with path.open("rb") as file:
                volume_id = unpack_file_header(file.read(FILE_HEADER_SIZE)).volume_id
        except (OSError, ValueError):
            continue  # damaged header: verify reports it
        groups.setdefault((path.parent, volume_id), []).append(path)
    removed: list[Path] = []
    for paths in groups.values():
        if len(paths) > 1:
            with rewriting(archive.data_dir):  # removes files: never while a backup copies them
                removed += _resolve_group(archive, sorted(paths, key=lambda path: volume_generation(path.name)))
    return removed


def _resolve_group(archive: Archive, paths: list[Path]) -> list[Path]:
    """Decide between the generations of one volume while holding their flocks.

    A running compaction holds the old file's flock from before it creates the new file until after it
    has unlinked the old one, so this waits for it instead of deleting its output.
    """
    descriptors: list[int] = []
    try:
        for path in paths:
            try:
                descriptors.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                continue
            fcntl.flock(descriptors[-1], fcntl.LOCK_EX)
        present = [path for path in paths if path.exists()]
        with archive.index.session() as session:
            known = {row.path for row in session.query(VolumeRow)}
        winners = [p for p in present if p.relative_to(archive.data_dir).as_posix() in known] or present[:1]
        removed = [path for path in present if path not in winners]
        for path in removed:
            log.warning("removing %s: left over by an interrupted compaction", path)
            path.unlink()
        if removed:
            fsync_directory(paths[0].parent)
        return removed
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def _resolved_volume_files(archive: Archive) -> list[Path]:
    """The volume files once interrupted compactions are resolved (the directory tree walked once: on a
    large archive the walk is most of a clean recovery)."""
    files = volume_files(archive)
    removed = set(resolve_generations(archive, files))
    return [path for path in files if path not in removed]


def recover(archive: Archive, progress: Progress | None = None) -> RecoveryReport:
    """Cut torn tails and index every record beyond each volume's ``indexed_end``."""
    report = RecoveryReport()
    _remove_stale_temporaries(archive)
    files = _resolved_volume_files(archive)
    with archive.index.session() as session:
        indexed = {row.path: row.indexed_end for row in session.query(VolumeRow)}
    for number, path in enumerate(files, 1):
        relative = archive.index_path(path)
        start = max(indexed.get(relative, 0), FILE_HEADER_SIZE)
        if path.stat().st_size != start:
            _catch_up(archive, path, relative, start, report)
        if progress:
            progress(number, len(files))
    report.volumes = len(files)
    return report


def reindex(archive: Archive, progress: Progress | None = None) -> RecoveryReport:
    """Rebuild the index from the volumes alone."""
    report = RecoveryReport()
    _remove_stale_temporaries(archive)
    files = _resolved_volume_files(archive)
    with archive.index.session() as session:
        clear_all(session)
    archive.level_cache.clear()
    for number, path in enumerate(files, 1):
        _reindex_volume(archive, path, archive.index_path(path), report)
        if progress:
            progress(number, len(files))
    report.volumes = len(files)
    return report


@contextmanager
def _indexing(archive: Archive, path: Path, report: RecoveryReport, what: str) -> Iterator[tuple[Volume, Session]]:
    """The volume at ``path``, opened for writing (which cuts a torn tail, counted in ``report``), and an
    index session committed at the end.  An error is reported and ends only this volume: one damaged
    volume must not stop the others."""
    size_before = path.stat().st_size
    try:
        with Volume.open(path, writable=True) as volume, archive.index.session() as session:
            report.torn_bytes_cut += size_before - volume.size()
            yield volume, session
    except Exception as exc:
        archive.level_cache.clear()  # keys cached in the rolled-back transaction must not be reused
        report.problems.append(f"{path}: {exc}")
        log.error("%s of %s stopped: %s", what, path, exc)


def _reindex_volume(archive: Archive, path: Path, relative: str, report: RecoveryReport) -> None:
    """Index the live records of one volume: the last record of each instance, unless a tombstone
    follows it.

    Not record by record as recovery does: a tombstone here deletes the copy in this volume only, and
    the instance may live on in another series' volume indexed before this one.  An instance live in
    two volumes (a crash between a cross-series replacement and its tombstone) keeps the copy in the
    volume indexed last, and is reported.
    """
    with _indexing(archive, path, report, "reindex") as (volume, session):
        for number, (uid, stored) in enumerate(live_instances(volume).items(), 1):
            elsewhere = instance_location(session, uid)
            if elsewhere is not None and elsewhere[0] != relative:
                report.problems.append(f"{path}: instance {uid} is also live in {elsewhere[0]}; "
                                       "the copy here is indexed")
            index_record(archive, session, stored, relative, report, exists=elsewhere is not None)
            if number % _BATCH == 0:
                session.commit()
        advance_indexed_end(session, relative, volume.size())


def _catch_up(archive: Archive, path: Path, relative: str, start: int, report: RecoveryReport) -> None:
    """Index the records of one volume from ``start``, in transactions of at most ``_BATCH`` records.

    ``indexed_end`` advances in the same transactions, so a crash here loses no progress but the last
    batch's, which the next recovery redoes.  Unacknowledged duplicates at the end are cut off; others
    are reported, and the archived records they follow in this volume are copied after them
    (:meth:`~.archive.Archive.put_archived_copy_last`).
    """
    followed: list[tuple[str, int]] = []  # archived records (uid, offset) an unacknowledged duplicate follows
    with _indexing(archive, path, report, "recovery") as (volume, session):
        unacknowledged: int | None = None  # where the current run of unacknowledged duplicates begins
        run: list[tuple[str, int]] = []  # the archived records that run's duplicates follow
        end = start
        for number, entry in enumerate(volume.walk_from(start), 1):
            end = entry.location.offset + entry.location.length
            if apply_record(archive, session, volume, relative, entry, report):
                if unacknowledged is not None:  # not at the end (another process appended since)
                    _report_unacknowledged(report, path, unacknowledged)
                    followed += run
                unacknowledged, run = None, []
            else:
                if unacknowledged is None:
                    unacknowledged = entry.location.offset
                uid = StoredInstance.read(volume, entry.location.offset).meta.sop_instance_uid
                run += archived_copy_followed(relative, entry, uid, instance_location(session, uid))
            if number % _BATCH == 0:
                session.commit()
        if unacknowledged is not None:
            if volume.cut_back(unacknowledged, end):
                report.duplicates_cut += end - unacknowledged
            else:
                _report_unacknowledged(report, path, unacknowledged)
                followed += run
    for uid, offset in followed:
        archive.put_archived_copy_last(relative, uid, offset)


def _report_unacknowledged(report: RecoveryReport, path: Path, offset: int) -> None:
    report.problems.append(f"{path}: records from offset {offset} duplicate archived instances and were never "
                           "acknowledged; not indexed")


def _remove_stale_temporaries(archive: Archive) -> None:
    """Remove half-created volume files left by a crash (they were never linked into place)."""
    for temporary in (archive.data_dir / VOLUMES_DIR).rglob(".*.tmp"):
        temporary.unlink(missing_ok=True)
