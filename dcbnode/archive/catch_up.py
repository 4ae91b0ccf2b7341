"""Bringing the index up to date with records it lacks, one record at a time.

Used by crash recovery (every record past a volume's ``indexed_end``) and by the store path: a writer
holds a volume's append lock until its index commit, so records that a writer finds between the
volume's ``indexed_end`` and the end of the file, once it holds the lock, were written by a writer that
died before its commit (a worker killed mid-store); they are indexed as recovery would index them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from ..dcbs import StoredInstance, Volume
from ..dcbs.dataset_split import parse_explicit_le
from ..dcbs.dictionary import read_dictionary
from ..dcbs.format import FILE_HEADER_SIZE, RecordKind
from ..dcbs.instance import has_raw_frames
from ..dcbs.record import unpack_tombstone
from ..dcbs.volume import RecordEntry
from ..index.attributes import index_attributes
from ..index.writer import (
    RecordPlacement,
    advance_indexed_end,
    indexed_end,
    instance_location,
    mark_compression_pending,
    remove_instance,
    upsert_instance,
)
from .paths import volume_stem

if TYPE_CHECKING:
    from .archive import Archive

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What recovery or reindex did."""

    volumes: int = 0
    torn_bytes_cut: int = 0
    instances_indexed: int = 0
    instances_removed: int = 0
    #: bytes of unacknowledged duplicate records cut off the end of volumes
    duplicates_cut: int = 0
    problems: list[str] = field(default_factory=list)


def index_left_behind(archive: Archive, session: Session, volume: Volume, relative: str,
                      end: int) -> list[tuple[str, int]]:
    """Index the records of ``volume`` (index path ``relative``) from its ``indexed_end`` up to ``end``, in
    ``session``.  The caller holds the volume's append lock and appends at ``end``: records before it
    that the index lacks were left by a writer that died between its record's fsync and its index commit
    (their senders got no status).

    An instance archived already (the dead writer's store was a duplicate) is left unindexed, and so is a
    replacement filed under another series (its tombstone would need that volume's lock).  Returns the
    (SOP Instance UID, record offset) of each archived record of this volume that such a duplicate now
    follows: the caller must append a copy of it (:meth:`~.archive.Archive.put_archived_copy_last`), or a
    ``reindex``, which takes an instance's last record in a volume, would serve the duplicate.
    """
    start = max(indexed_end(session, relative), FILE_HEADER_SIZE)
    if start >= end:
        return []
    report = RecoveryReport()
    followed: list[tuple[str, int]] = []
    for entry in volume.walk_from(start):
        if entry.location.offset >= end:
            break
        if entry.header.kind == RecordKind.INSTANCE:
            stored = StoredInstance.read(volume, entry.location.offset)
            current = instance_location(session, stored.meta.sop_instance_uid)
            if current is not None and (archive.duplicate_policy != "replace" or current[0] != relative):
                log.warning("%s: the record at offset %d (SOP Instance %s), left by a store that ended before "
                            "its index commit, duplicates an archived instance: not indexed", relative,
                            entry.location.offset, stored.meta.sop_instance_uid)
                followed += archived_copy_followed(relative, entry, stored.meta.sop_instance_uid, current)
                continue
        apply_record(archive, session, volume, relative, entry, report)
    if report.instances_indexed:
        log.warning("%s: indexed %d instance(s) whose store ended between the record's fsync and its index "
                    "commit (a process that died; their senders got no status)", relative,
                    report.instances_indexed)
    return followed


def archived_copy_followed(relative: str, entry: RecordEntry, sop_instance_uid: str,
                           current: tuple[str, int] | None) -> list[tuple[str, int]]:
    """``[(uid, offset)]`` of the archived record of an instance (the index places it at ``current``) when
    it lies in the same volume ``relative`` before ``entry``, an unacknowledged duplicate of it; else []."""
    if current is None or current[0] != relative or current[1] >= entry.location.offset:
        return []
    return [(sop_instance_uid, current[1])]


def apply_record(archive: Archive, session: Session, volume: Volume, relative: str, entry: RecordEntry,
                 report: RecoveryReport) -> bool:
    """Bring the index up to date with one record; False (nothing done) for an unacknowledged duplicate."""
    end = entry.location.offset + entry.location.length
    if entry.header.kind == RecordKind.DICTIONARY:
        read_dictionary(volume, entry.location.offset)  # checked now: the records after it need it
        advance_indexed_end(session, relative, end)
        return True
    if entry.header.kind == RecordKind.TOMBSTONE:
        _, block = volume.read_meta(entry.location.offset)
        uid = unpack_tombstone(block)["sop_instance_uid"]
        # A tombstone deletes the copy in its own volume only: under "replace", a copy filed under
        # another series took the instance over, and the old series' volume got the tombstone.
        location = instance_location(session, uid)
        if location is not None and location[0] == relative and remove_instance(session, uid):
            report.instances_removed += 1
            archive.level_cache.clear()  # the series row may be gone with its last instance
        advance_indexed_end(session, relative, end)
        return True
    stored = StoredInstance.read(volume, entry.location.offset)
    uid = stored.meta.sop_instance_uid
    current = instance_location(session, uid)
    if current is not None and archive.duplicate_policy != "replace":
        # The store that wrote this record found the instance already archived and was cutting the record
        # back (its status: duplicate) when the process ended.  The archived copy stays.
        return False
    if current is not None and current[0] != relative:
        # A replacement filed under another series whose tombstone for the old copy was not written yet:
        # write it first, so the old copy cannot come back in a reindex.
        archive.tombstone(current[0], uid, stored.meta.series_instance_uid)
    index_record(archive, session, stored, relative, report, exists=current is not None)
    return True


def index_record(archive: Archive, session: Session, stored: StoredInstance, relative: str,
                 report: RecoveryReport, *, exists: bool) -> None:
    """Point the index at ``stored`` (and advance its volume's ``indexed_end`` past it); ``exists``: the
    instance has an index row already (the caller just looked)."""
    location = stored.location
    header = parse_explicit_le(stored.blobs.header)
    placement = RecordPlacement(relative, location.offset, location.length, stored.meta.received_length,
                                location.length, stored.meta.received_syntax, _source_ae_title(stored))
    upsert_instance(session, index_attributes(header), placement, archive.level_cache, exists=exists)
    if has_raw_frames(stored.meta):  # its store died before committing the volume's pending mark
        mark_compression_pending(session, volume_stem(relative))
        archive.pending.note(volume_stem(relative))
    report.instances_indexed += 1


def _source_ae_title(stored: StoredInstance) -> str:
    if not stored.blobs.file_meta:
        return ""
    meta: Dataset = parse_explicit_le(stored.blobs.file_meta)
    return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()[:16]
