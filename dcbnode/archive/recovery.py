"""Bringing the index in line with the volumes: crash recovery and full reindex.

The volumes are the source of truth.  After a crash, a volume may end in a torn record (cut here)
or hold records that reached the disk but not the index (indexed here).  ``reindex`` rebuilds the
whole index from the volumes alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from ..dcbs import StoredInstance, Volume
from ..dcbs.dataset_split import parse_explicit_le
from ..dcbs.format import FILE_HEADER_SIZE, RecordKind
from ..dcbs.record import unpack_tombstone
from ..dcbs.volume import RecordEntry
from ..index.attributes import index_attributes
from ..index.models import VolumeRow
from ..index.writer import RecordPlacement, advance_indexed_end, clear_all, remove_instance, upsert_instance
from .archive import VOLUMES_DIR, Archive

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class RecoveryReport:
    """What recovery or reindex did."""

    volumes: int = 0
    torn_bytes_cut: int = 0
    instances_indexed: int = 0
    instances_removed: int = 0
    problems: list[str] = field(default_factory=list)


def volume_files(archive: Archive) -> list[Path]:
    """Every volume file under the data directory, sorted."""
    return sorted((archive.data_dir / VOLUMES_DIR).rglob("*.dcbs"))


def recover(archive: Archive, progress: Progress | None = None) -> RecoveryReport:
    """Cut torn tails and index every record beyond each volume's ``indexed_end``."""
    report = RecoveryReport()
    _remove_stale_temporaries(archive)
    with archive.index.session() as session:
        indexed = {row.path: row.indexed_end for row in session.query(VolumeRow)}
    files = volume_files(archive)
    for number, path in enumerate(files, 1):
        relative = path.relative_to(archive.data_dir).as_posix()
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
    with archive.index.session() as session:
        clear_all(session)
    files = volume_files(archive)
    for number, path in enumerate(files, 1):
        _catch_up(archive, path, path.relative_to(archive.data_dir).as_posix(), FILE_HEADER_SIZE, report)
        if progress:
            progress(number, len(files))
    report.volumes = len(files)
    return report


def _catch_up(archive: Archive, path: Path, relative: str, start: int, report: RecoveryReport) -> None:
    size_before = path.stat().st_size
    try:
        with Volume.open(path, writable=True) as volume:  # a writable open cuts a torn tail
            report.torn_bytes_cut += size_before - volume.size()
            for entry in volume.walk_from(start):
                _apply(archive, volume, relative, entry, report)
    except Exception as exc:  # one damaged volume must not stop the others from being recovered
        report.problems.append(f"{path}: {exc}")
        log.error("recovery of %s stopped: %s", path, exc)


def _apply(archive: Archive, volume: Volume, relative: str, entry: RecordEntry, report: RecoveryReport) -> None:
    end = entry.location.offset + entry.location.length
    with archive.index.session() as session:
        if entry.header.kind == RecordKind.TOMBSTONE:
            _, block = volume.read_meta(entry.location.offset)
            if remove_instance(session, unpack_tombstone(block)["sop_instance_uid"]):
                report.instances_removed += 1
            advance_indexed_end(session, relative, end)
            return
        stored = StoredInstance.read(volume, entry.location.offset)
        header = parse_explicit_le(stored.blobs.header)
        placement = RecordPlacement(relative, entry.location.offset, entry.location.length,
                                    stored.meta.received_length, entry.location.length,
                                    stored.meta.received_syntax, _source_ae_title(stored))
        upsert_instance(session, index_attributes(header), placement)
        report.instances_indexed += 1


def _source_ae_title(stored: StoredInstance) -> str:
    if not stored.blobs.file_meta:
        return ""
    meta: Dataset = parse_explicit_le(stored.blobs.file_meta)
    return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()[:16]


def _remove_stale_temporaries(archive: Archive) -> None:
    """Remove half-created volume files left by a crash (they were never linked into place)."""
    for temporary in (archive.data_dir / VOLUMES_DIR).rglob(".*.tmp"):
        temporary.unlink(missing_ok=True)
