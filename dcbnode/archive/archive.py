"""Storing instances durably into series volumes and indexing them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from ..dcbs import (
    DcbsError,
    DcbsFormatError,
    EncodedInstance,
    InvalidDatasetError,
    RecordLocation,
    StoredInstance,
    Volume,
    VolumeFullError,
    VolumeNotFoundError,
    VolumeReplacedError,
    append_instances,
    append_tombstone,
    parse_instance,
)
from ..dcbs.format import RECORD_HEADER_SIZE
from ..dcbs.instance import ParsedInstance, has_raw_frames
from ..index import Index
from ..index.attributes import LevelAttributeCache
from ..index.database import DEFAULT_BUSY_TIMEOUT, CommitUnknownError, is_disk_full
from ..index.writer import (
    LevelCache,
    RecordPlacement,
    advance_from,
    advance_indexed_end,
    compression_pending,
    find_instance,
    indexed_generations,
    instance_location,
    instance_locations,
    mark_compression_pending,
    relocate_instance,
    remove_instance,
    upsert_instance,
)
from .catch_up import index_left_behind
from .group_commit import Batch, GroupCommit
from .paths import VOLUMES_DIR, volume_generation, volume_path_for, volume_stem
from .pool import VolumePool
from .unsettled import IndexedRecord, UnsettledCommits

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("keep_first", "replace", "reject")
_INDEX_ATTEMPTS = 3
_REOPEN_ATTEMPTS = 3
T = TypeVar("T")


class StoreOutcome(Enum):
    """What a store did."""

    STORED = "stored"
    REPLACED = "replaced"  #: a duplicate replaced the earlier copy (policy "replace")
    DUPLICATE_IGNORED = "duplicate ignored"  #: a duplicate was discarded (policy "keep_first")


#: an instance to commit, and the AE title it came from
_Submission = tuple[EncodedInstance, str]


class DuplicateInstanceError(DcbsError):
    """The SOP Instance UID is already stored and the policy is "reject"."""


class _NotThereAnyMore(Exception):
    """Raised inside an index commit when the row to move no longer points at the record."""


class _DuplicateFound(Exception):
    """Raised inside the index commit to cut back a record whose UID turned out to exist."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The outcome of :meth:`Archive.store`."""

    outcome: StoreOutcome
    sop_instance_uid: str
    sop_class_uid: str
    received_bytes: int
    stored_bytes: int


class PendingVolumes:
    """Volumes holding raw frames (compression deferred), by volume stem, with when each last got one;
    and which volume files this process has marked in the index.

    The index keeps the set durably (``pending_compression``, by stem).  The marks are remembered per
    *file* (generation): compaction clears a volume's mark when it replaces the file, and the first raw
    record that reaches the next generation marks the volume again.  So ingest looks nothing up per
    instance, and the index's mark is never missing while a file holds raw frames.
    """

    def __init__(self, *, timed: bool = True) -> None:
        """``timed=False``: no compressor in this process takes the idle volumes (a node worker), so
        :meth:`note` keeps nothing."""
        self._lock = threading.Lock()
        self._timed = timed
        self._last_store: dict[str, float] = {}
        self._marked: set[str] = set()

    def needs_mark(self, relative: str) -> bool:
        """Whether a raw record stored into the volume file ``relative`` must mark it in the index."""
        with self._lock:
            return relative not in self._marked

    def marked(self, relative: str) -> None:
        """The index marks the volume file ``relative`` (committed)."""
        with self._lock:
            self._marked.add(relative)

    def unmarked(self, relative: str) -> None:
        """Compaction cleared the index's mark of the volume file ``relative`` (it replaced the file, or
        found no raw frames in it); called while it still holds the volume's lock."""
        with self._lock:
            self._marked.discard(relative)

    def __len__(self) -> int:
        with self._lock:
            return len(self._last_store)

    def note(self, stem: str, age: float = 0.0) -> None:
        """A record with raw frames was stored into the volume ``stem`` ``age`` seconds ago (the latest
        store noted counts)."""
        if not self._timed:
            return
        last = time.monotonic() - age
        with self._lock:
            self._last_store[stem] = max(self._last_store.get(stem, last), last)

    def take_idle(self, seconds: float) -> list[str]:
        """Forget and return the volumes that received nothing for ``seconds``, longest idle first.

        Taken *before* they are compressed: a store that comes meanwhile marks its volume pending
        again, in the index and here, so it is compressed in a later round.
        """
        now = time.monotonic()
        with self._lock:
            idle = sorted((last, stem) for stem, last in self._last_store.items() if now - last >= seconds)
            for _, stem in idle:
                del self._last_store[stem]
        return [stem for _, stem in idle]


class Archive:
    """Volumes under ``data_dir/volumes`` and their index."""

    def __init__(self, data_dir: Path, database_url: str, *, duplicate_policy: str = "keep_first",
                 compresses: bool = True, index_busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        """``compresses=False``: another process compresses this archive's deferred volumes (a node
        worker), so this one does not keep track of when they went idle.  ``index_busy_timeout``: see
        :class:`~dcbnode.index.database.Index`."""
        if duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"unknown duplicate policy {duplicate_policy!r}")
        self.data_dir = Path(data_dir)
        self.duplicate_policy = duplicate_policy
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / VOLUMES_DIR).mkdir(exist_ok=True)
        self.index = Index(database_url, busy_timeout=index_busy_timeout)
        self.index.prepare_schema()  # raises SchemaError for an index of another dcbnode version
        self.volumes = VolumePool()
        self.level_cache = LevelCache()
        self.attribute_cache = LevelAttributeCache()
        #: index commits that failed with an unknown outcome, and the records kept for them
        self.unsettled = UnsettledCommits(self.index, self.level_cache)
        #: volume stem → index path of its current generation (see _current_generation)
        self._generations: dict[str, str] = {}
        self._generations_lock = threading.Lock()
        #: stores into one volume arriving together are committed together
        self._group_commit: GroupCommit[str, _Submission, str | None] = GroupCommit(self._commit_batch)
        #: volumes with raw frames: those of the index, and those this process stores into
        self.pending = PendingVolumes(timed=compresses)
        if compresses:
            with self.index.engine.connect() as connection:
                for stem in compression_pending(connection):
                    self.pending.note(stem)

    def close(self) -> None:
        """Close volumes and database connections."""
        self.volumes.close()
        self.index.dispose()

    def volume_file(self, relative_path: str) -> Path:
        """Absolute path of a volume from its index path."""
        return self.data_dir / relative_path

    def index_path(self, volume_file: Path) -> str:
        """The index path of a volume file: relative to the data directory, POSIX separators."""
        return volume_file.relative_to(self.data_dir).as_posix()

    # -- ingest ----------------------------------------------------------------------------------------

    def store(
        self,
        data: bytes | memoryview,
        *,
        source_ae_title: str = "",
        transfer_syntax: str | None = None,
        file_meta: bytes | None = None,
        expected_sop_instance_uid: str | None = None,
        defer_compression: bool = False,
    ) -> StoreResult:
        """Store Part-10 bytes, or a dataset as received (``transfer_syntax`` and the ``file_meta`` group to
        keep with it, as the C-STORE SCP has them); returns only once the instance is fsynced and committed
        in the index.

        ``expected_sop_instance_uid`` (a C-STORE's Affected SOP Instance UID) must match the dataset's.
        ``defer_compression`` stores native frames uncompressed (codec ``raw``) and marks the volume for
        compression, which compaction does later (the node's ``Compressor``): a faster store, a larger
        volume until then.  Raises :class:`~dcbnode.dcbs.InvalidDatasetError` for input that cannot be
        stored faithfully, :class:`DuplicateInstanceError` under the "reject" policy, and
        :class:`~dcbnode.dcbs.VolumeFullError` when the disk is full.  Nothing is left behind on error, but
        for one case: an index COMMIT that failed and whose outcome the index could not tell in time leaves
        its record in the volume (it raises the database error like any other).
        """
        parsed = parse_instance(data, transfer_syntax=transfer_syntax, file_meta=file_meta)
        if expected_sop_instance_uid is not None and parsed.sop_instance_uid != expected_sop_instance_uid:
            raise InvalidDatasetError("SOP Instance UID differs from the C-STORE request")
        # Looked up first only when that saves a compression; the index commit checks again anyway.
        duplicate = None if defer_compression else self._duplicate(parsed)
        if duplicate is not None:
            return duplicate
        encoded = parsed.encode(defer_compression=defer_compression)
        meta = encoded.meta
        result = StoreResult(StoreOutcome.STORED, meta.sop_instance_uid, meta.sop_class_uid,
                             meta.received_length, encoded.stored_length)
        first_generation = volume_path_for(meta.series_instance_uid)
        for _ in range(_INDEX_ATTEMPTS):
            try:
                previous = self._group_commit.submit(first_generation, (encoded, source_ae_title))
                break
            except _DuplicateFound:  # stored already (a concurrent store may have won the race)
                duplicate = self._duplicate(parsed)
                if duplicate is not None:
                    return duplicate
                # ... and deleted again since: store it after all
            except DBAPIError as exc:  # the record was cut back (or kept: see .unsettled); a full disk is
                # not a fault of ours
                if is_disk_full(exc):
                    raise VolumeFullError(f"index database: {exc.orig}") from exc
                raise
        else:
            raise DcbsError(f"SOP Instance {parsed.sop_instance_uid} kept appearing and disappearing in the "
                            "index while it was being stored")
        if has_raw_frames(meta):
            self.pending.note(volume_stem(first_generation))
        if previous is None:
            return result
        if volume_stem(previous) != volume_stem(first_generation):
            # replaced a copy filed under another series: delete it there
            self.tombstone(previous, meta.sop_instance_uid, meta.series_instance_uid)
        return _with(result, StoreOutcome.REPLACED)

    def _duplicate(self, parsed: ParsedInstance) -> StoreResult | None:
        """The outcome of storing an instance the index has already, unless the policy replaces it (None
        also when it is not stored); raises :class:`DuplicateInstanceError` under "reject"."""
        if self.duplicate_policy == "replace":
            return None
        with self.index.engine.connect() as connection:  # a read: no session, no commit
            if instance_location(connection, parsed.sop_instance_uid) is None:
                return None
        if self.duplicate_policy == "reject":
            raise DuplicateInstanceError(f"SOP Instance {parsed.sop_instance_uid} is already stored")
        return StoreResult(StoreOutcome.DUPLICATE_IGNORED, parsed.sop_instance_uid, parsed.uids["SOPClassUID"],
                           parsed.split.received_length, 0)

    def _commit_batch(self, first_generation: str, batch: Batch[_Submission]) -> list[str | BaseException | None]:
        """Append, fsync and index ``batch`` (stores into one volume, see :mod:`.group_commit`) together;
        returns each one's replaced copy's volume (or None), or the error its store must raise.

        If the batch fails because one of its instances is stored already (or a level row was created
        concurrently), it was cut back whole: each is then committed on its own, so that the outcome of
        one is never another's.  Any other error (index unavailable, disk full) is every one's.
        """
        try:
            return list(self._append_batch(first_generation, batch.first, batch.take))
        except (_DuplicateFound, IntegrityError):
            if len(batch.take()) == 1:
                raise
        outcomes: list[str | BaseException | None] = []
        for submission in batch.take():
            try:
                outcomes.extend(self._append_batch(first_generation, submission, lambda one=submission: [one]))
            except Exception as exc:  # handed to that instance's store, which raises it
                outcomes.append(exc)
        return outcomes

    def _append_batch(self, first_generation: str, first: _Submission,
                      gather: Callable[[], list[_Submission]]) -> list[str | None]:
        followed: list[tuple[str, str, int]] = []  # archived records a dead writer's duplicate follows
        replaced = self._append(first_generation, lambda volume, relative: append_instances(
            volume, first[0], lambda: [encoded for encoded, _ in gather()],
            lambda locations, wait_durable: self._index(gather(), volume, relative, locations, wait_durable,
                                                        followed)))[1]
        for relative, uid, offset in followed:
            self.put_archived_copy_last(relative, uid, offset)
        return replaced

    def indexed_record(self, encoded: EncodedInstance, relative: str, location: RecordLocation,
                       source_ae_title: str) -> IndexedRecord:
        """What the index holds for a received instance's record at ``location`` in volume ``relative``."""
        meta = encoded.meta
        placement = RecordPlacement(relative, location.offset, location.length, meta.received_length,
                                    location.length, meta.received_syntax, source_ae_title[:16])
        assert encoded.dataset is not None  # a received instance
        return IndexedRecord(self.attribute_cache.attributes(encoded.dataset), placement,
                             volume_stem(relative) if has_raw_frames(meta) else None)

    def _index(
        self, batch: list[_Submission], volume: Volume, relative: str, locations: list[RecordLocation],
        wait_durable: Callable[[], None], followed: list[tuple[str, str, int]],
    ) -> list[str | None]:
        """Write the index rows of records whose fsync is under way, and commit them once it is durable;
        returns each one's replaced copy's volume, if any.  Raises :class:`_DuplicateFound` if one of them
        is indexed already (policies other than "replace").

        ``indexed_end`` moves from where the batch starts to where it ends (one statement for the batch); if
        it was not where the batch starts, records before it lack their index rows — left by a writer that
        died between its fsync and its commit, since writers hold the lock until they commit — and are
        indexed in the same transaction first (:func:`~.catch_up.index_left_behind`); ``followed`` gets the
        archived records that one of those duplicates, for :meth:`put_archived_copy_last` once the batch is
        committed.
        """
        records = [self.indexed_record(encoded, relative, location, source_ae_title)
                   for (encoded, source_ae_title), location in zip(batch, locations, strict=True)]
        # Marked in the index by the first raw record of each volume file (see PendingVolumes).
        mark = any(record.pending_stem for record in records) and self.pending.needs_mark(relative)
        self.unsettled.settle(relative)  # records kept after failed commits, now that the volume is locked
        for attempt in range(_INDEX_ATTEMPTS):
            try:
                with self.index.committing() as session:
                    replaced = [self._index_row(session, record) for record in records]
                    start, end = locations[0].offset, locations[-1].offset + locations[-1].length
                    if not advance_from(session, relative, start, end, self.level_cache):
                        followed[:] = [(relative, uid, offset) for uid, offset
                                       in index_left_behind(self, session, volume, relative, start)]
                        advance_indexed_end(session, relative, end)
                    if mark:
                        mark_compression_pending(session, volume_stem(relative))
                    wait_durable()  # the commit (leaving the block) must not come before the fsync
            except IntegrityError:
                # Two stores created the same patient/study/series row at once (the loser retries and
                # finds the winner's committed row), or a cached row was deleted meanwhile.
                self.level_cache.clear()
                if attempt == _INDEX_ATTEMPTS - 1:
                    raise
                continue
            except CommitUnknownError as failed:
                self.level_cache.clear()  # keys it cached may not have been committed
                self.unsettled.failed(failed.error, records)  # returns only if the commit took effect
            if mark:
                self.pending.marked(relative)
            return replaced
        raise AssertionError("unreachable")

    def put_archived_copy_last(self, relative: str, sop_instance_uid: str, offset: int) -> None:
        """Append a copy of the archived record of an instance at ``offset`` in volume ``relative`` and point
        the index at the copy, when an unacknowledged duplicate record of it (a dead writer's) follows it in
        the volume: a volume's last record of an instance is the one ``reindex`` and compaction keep, and
        it must be the archived one.  Nothing is done if the index no longer points there."""

        def copy(volume: Volume, current: str) -> None:
            if current != relative:
                return  # compaction replaced the volume meanwhile: its new generation holds the archived copy
            StoredInstance.read(volume, offset)  # an instance record, checked before it is copied
            header, meta = volume.read_meta(offset)
            data_start = offset + RECORD_HEADER_SIZE + header.meta_length
            data = volume.read_exact(data_start, header.payload_length - header.meta_length)
            volume.append(header.kind, meta, [data], layout=header.layout, dictionary_id=header.dictionary_id,
                          on_durable=lambda location: self._relocate(sop_instance_uid, relative, offset, location))

        try:
            self._append(relative, copy)
        except _NotThereAnyMore:
            return
        log.warning("%s: SOP Instance %s's archived record (offset %d) copied to the end of its volume, after an "
                    "unacknowledged duplicate a dead writer left there", relative, sop_instance_uid, offset)

    def _relocate(self, sop_instance_uid: str, relative: str, offset: int, location: RecordLocation) -> None:
        with self.index.session() as session:
            if not relocate_instance(session, sop_instance_uid, relative, offset, location.offset, location.length):
                raise _NotThereAnyMore  # deleted or replaced since: the copy is cut back

    def _index_row(self, session: Session, record: IndexedRecord) -> str | None:
        """Index one record; returns the replaced copy's volume, if any."""
        attributes, placement = record.attributes, record.placement
        if self.duplicate_policy == "replace":
            current = instance_location(session, attributes.sop_instance_uid)
            upsert_instance(session, attributes, placement, self.level_cache, exists=current is not None,
                            advance=False)
            return current[0] if current is not None else None
        if upsert_instance(session, attributes, placement, self.level_cache, keep_existing=True, advance=False):
            return None
        raise _DuplicateFound

    def tombstone(self, relative: str, sop_instance_uid: str, series_instance_uid: str) -> None:
        """Delete the copy of an instance in the volume ``relative``, leaving the index alone (the instance
        lives on in another volume)."""
        self._append(relative, lambda volume, _: append_tombstone(volume, sop_instance_uid, series_instance_uid))

    def _append(self, relative: str, action: Callable[[Volume, str], T]) -> T:
        """Run ``action(volume, its index path)`` on the current generation of the volume ``relative``
        names (any generation of it), reopening it if compaction replaced the file meanwhile."""
        for attempt in range(_REOPEN_ATTEMPTS):
            current, create = self._current_generation(relative)
            try:
                with self.volumes.borrow(self.volume_file(current), writable=True, create=create) as volume:
                    return action(volume, current)
            except (VolumeReplacedError, VolumeNotFoundError):
                self.volumes.forget(self.volume_file(current))
                with self._generations_lock:
                    self._generations.pop(volume_stem(current), None)
                if attempt == _REOPEN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def current_volume_file(self, stem: str) -> Path | None:
        """The file of the current generation of the volume ``stem``, as the index has it now (None if the
        index has no generation of it)."""
        current = self._indexed_generation(stem)
        return self.volume_file(current) if current is not None else None

    def _indexed_generation(self, stem: str) -> str | None:
        """The index path of the volume ``stem``'s latest generation in the index, or None."""
        with self.index.engine.connect() as connection:
            known = indexed_generations(connection, stem)
        return max(known, key=volume_generation) if known else None

    def _current_generation(self, relative: str) -> tuple[str, bool]:
        """The index path of the volume's current generation, and whether a missing file may be created.

        Compaction turns ``<hash>.dcbs`` into ``<hash>.g2.dcbs`` and so on; later appends must go
        there, not into a new first generation beside it.  The index decides (compaction moves the
        volume row in the transaction that moves the instances).  Only a volume the index does not know
        at all is created if missing.  A known path whose file is gone means compaction replaced it
        since — even one just read from the index, which compaction may have committed past before the
        file is opened: it is looked up again, never created anew beside the new generation.
        """
        stem = volume_stem(relative)
        with self._generations_lock:
            cached = self._generations.get(stem)
        if cached is not None:
            return cached, False
        indexed = self._indexed_generation(stem)
        current = indexed or relative
        with self._generations_lock:
            self._generations[stem] = current
        return current, indexed is None

    # -- retrieval -------------------------------------------------------------------------------------

    def instance_locations(self, sop_instance_uids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Where the indexed ones of ``sop_instance_uids`` are stored, for :meth:`open_instance` (one query)."""
        with self.index.session() as session:
            return instance_locations(session, sop_instance_uids)

    @contextmanager
    def open_instance(self, sop_instance_uid: str, location: tuple[str, int] | None = None
                      ) -> Iterator[StoredInstance]:
        """The stored record of an instance, read and checked (raises KeyError if not indexed).

        ``location`` from :meth:`instance_locations` saves the index lookup; if compaction has moved the
        record since, the index is asked again.
        """
        for attempt in range(_REOPEN_ATTEMPTS):
            if location is None or attempt:
                with self.index.session() as session:
                    location = instance_location(session, sop_instance_uid)
            if location is None:
                raise KeyError(sop_instance_uid)
            relative, offset = location
            path = self.volume_file(relative)
            if not path.exists() and attempt < _REOPEN_ATTEMPTS - 1:
                continue  # compaction moved the record between the lookup and the open: look again
            with self.volumes.borrow(path, writable=False) as volume:
                yield StoredInstance.read(volume, offset)
            return

    # -- deletion --------------------------------------------------------------------------------------

    def delete_instance(self, sop_instance_uid: str) -> bool:
        """Delete an instance: a tombstone in its volume, then its index rows."""
        for attempt in range(_REOPEN_ATTEMPTS):
            with self.index.session() as session:
                row = find_instance(session, sop_instance_uid)
                if row is None:
                    return False
                relative, series_uid = row.volume.path, row.series.series_instance_uid
            try:
                self._delete_from(relative, sop_instance_uid, series_uid)
                return True
            except (VolumeReplacedError, DcbsFormatError):
                # Compaction moved the instance to a new volume meanwhile: look it up again.
                if attempt == _REOPEN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _delete_from(self, relative: str, sop_instance_uid: str, series_uid: str) -> None:
        """Append the tombstone; its durability commits the index removal."""
        self._append(relative, lambda volume, current: append_tombstone(
            volume, sop_instance_uid, series_uid,
            on_durable=lambda location: self._unindex(sop_instance_uid, current, location)))

    def _unindex(self, sop_instance_uid: str, relative: str, location: RecordLocation) -> None:
        with self.index.session() as session:
            remove_instance(session, sop_instance_uid)
            advance_indexed_end(session, relative, location.offset + location.length)
        # After the commit: the series row may be gone with its last instance.  A store that cached its
        # key in between fails on the foreign key, clears the cache and retries (see _index).
        self.level_cache.clear()


def _with(result: StoreResult, outcome: StoreOutcome) -> StoreResult:
    return StoreResult(outcome, result.sop_instance_uid, result.sop_class_uid, result.received_bytes,
                       result.stored_bytes)
