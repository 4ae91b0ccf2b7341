"""Instances in a volume: appending them, and finding the live ones.

A volume is a log.  An instance record for a SOP Instance UID already in the volume supersedes the
earlier one (the "replace" duplicate policy); a tombstone record deletes it.  The live set is what
remains when the log is read from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from .dictionary import SharedDictionary, dictionary_for_append
from .errors import CorruptRecordError
from .format import MetaLayout, RecordKind
from .instance import EncodedInstance
from .record import pack_tombstone, unpack_tombstone
from .stored import StoredInstance
from .volume import NewRecord, RecordLocation, Volume

T = TypeVar("T")


def append_instance(
    volume: Volume,
    encoded: EncodedInstance,
    on_durable: Callable[[RecordLocation], T] | None = None,
    *,
    on_written: Callable[[RecordLocation, Callable[[], None]], T] | None = None,
) -> tuple[RecordLocation, T | None]:
    """Append an encoded instance; it is on disk (fsync) before ``on_durable`` runs (``on_written``: see
    :meth:`Volume.append`)."""
    record = _instance_record(volume, encoded)
    return volume.append(record.kind, record.meta, record.data_parts, layout=record.layout,
                         dictionary_id=record.dictionary_id, on_durable=on_durable, on_written=on_written)


def append_instances(
    volume: Volume, first: EncodedInstance, gather: Callable[[], Sequence[EncodedInstance]],
    on_written: Callable[[list[RecordLocation], Callable[[], None]], T],
) -> tuple[list[RecordLocation], T]:
    """Append several encoded instances under one lock and one fsync (:meth:`Volume.append_many`): all of
    them, or none if anything fails.  ``gather()`` gives them once the volume is locked (a group commit
    takes what queued meanwhile); ``first`` is one of them, known before (a new volume's dictionary is
    made from it)."""
    dictionary = dictionary_for_append(volume, first.dictionary_candidate)
    first_record = _record(dictionary, first)  # before the lock: the others exist only once it is held

    def records() -> list[NewRecord]:
        return [first_record if instance is first else _record(dictionary, instance) for instance in gather()]

    return volume.append_many(records, on_written)


def _instance_record(volume: Volume, encoded: EncodedInstance) -> NewRecord:
    """The record of an encoded instance.  The first instance of a volume writes the volume's dictionary
    record first."""
    return _record(dictionary_for_append(volume, encoded.dictionary_candidate), encoded)


def _record(dictionary: SharedDictionary, encoded: EncodedInstance) -> NewRecord:
    meta, frames = encoded.record(dictionary)
    return NewRecord(RecordKind.INSTANCE, meta, frames, MetaLayout.COMPACT, dictionary.id)


def append_tombstone(
    volume: Volume, sop_instance_uid: str, series_instance_uid: str,
    on_durable: Callable[[RecordLocation], T] | None = None,
) -> tuple[RecordLocation, T | None]:
    """Append a tombstone that deletes ``sop_instance_uid`` from this volume."""
    meta = pack_tombstone(sop_instance_uid, series_instance_uid, datetime.now(UTC).isoformat())
    return volume.append(RecordKind.TOMBSTONE, meta, on_durable=on_durable)


def live_instances(volume: Volume, *, start: int | None = None) -> dict[str, StoredInstance]:
    """The live instances of a volume by SOP Instance UID, in the order they were last written.

    Every record's metadata checksum is verified on the way; frame data is not read.
    """
    live: dict[str, StoredInstance] = {}
    entries = volume.records() if start is None else volume.walk_from(start)
    for entry in entries:
        offset = entry.location.offset
        if entry.header.kind == RecordKind.DICTIONARY:
            continue
        if entry.header.kind == RecordKind.TOMBSTONE:
            _, block = volume.read_meta(offset)
            try:
                live.pop(unpack_tombstone(block)["sop_instance_uid"], None)
            except (ValueError, KeyError) as exc:
                raise CorruptRecordError(volume.path, offset, f"unreadable tombstone: {exc}") from exc
            continue
        stored = StoredInstance.read(volume, offset)
        live.pop(stored.meta.sop_instance_uid, None)
        live[stored.meta.sop_instance_uid] = stored
    return live
