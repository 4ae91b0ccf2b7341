"""Index commits whose outcome is unknown: deciding each, and settling the records kept meanwhile.

A store commits its index rows once its volume record is durable.  If the COMMIT itself fails
(:class:`~dcbnode.index.database.CommitUnknownError`), the index is asked again
(:func:`~dcbnode.index.commit_outcome.commit_took_effect`): if the instance is placed at the record, the
store succeeded; if not, the record is cut back and the store fails.  If the index cannot tell within
``index_busy_timeout``, the store fails but the record stays, since the index may point at it; it is
remembered here, and the next store into the same volume (in this process, under the volume's append lock)
settles it: if the COMMIT did not take effect after all, the record is indexed, as recovery would index a
durable record the index lacks.  See docs/reliability.md.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

from ..dcbs import KeepRecord
from ..index import Index
from ..index.attributes import IndexAttributes
from ..index.commit_outcome import commit_took_effect
from ..index.database import reason
from ..index.writer import LevelCache, RecordPlacement, mark_compression_pending, upsert_instance

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IndexedRecord:
    """What a store's index transaction writes for its record."""

    attributes: IndexAttributes
    placement: RecordPlacement
    #: the volume stem to mark for deferred compression with it (the record holds raw frames), or None
    pending_stem: str | None


class UnsettledCommits:
    """The failed index commits of this process, and the records kept for those it could not decide."""

    def __init__(self, index: Index, level_cache: LevelCache) -> None:
        self._index = index
        self._level_cache = level_cache
        self._lock = threading.Lock()
        self._kept: dict[str, list[IndexedRecord]] = {}  #: by volume path

    def failed(self, error: DBAPIError, records: list[IndexedRecord]) -> None:
        """The COMMIT of the one transaction indexing ``records`` (a group commit's batch: all or none took
        effect) raised ``error``: return if it took effect (the stores succeeded); otherwise raise
        ``error`` (the records are cut back); if the index cannot tell in time, raise it in a
        :class:`~dcbnode.dcbs.KeepRecord` (the records stay) and remember the records."""
        placement = records[0].placement
        uid = records[0].attributes.sop_instance_uid
        where = f"{placement.volume_path} from offset {placement.offset}"
        others = f" and {len(records) - 1} other instance(s)" if len(records) > 1 else ""
        took_effect = commit_took_effect(self._index, uid, placement.volume_path, placement.offset,
                                         self._index.busy_timeout)
        if took_effect:
            log.warning("index commit of %s%s failed (%s), but it took effect: stored at %s", uid, others,
                        reason(error), where)
            return
        if took_effect is False:
            log.warning("index commit of %s%s failed (%s) and did not take effect: cut back", uid, others,
                        reason(error))
            raise error
        log.error("index commit of %s%s failed (%s) and the index could not tell within %.0f s whether it took "
                  "effect: kept at %s, to be indexed by the next store into the series if the commit did not "
                  "take effect", uid, others, reason(error), self._index.busy_timeout, where)
        for record in records:
            self.keep(record)
        raise KeepRecord(error)

    def keep(self, record: IndexedRecord) -> None:
        """Remember a record kept in its volume without knowing whether the index has it."""
        with self._lock:
            self._kept.setdefault(record.placement.volume_path, []).append(record)

    def settle(self, volume_path: str) -> None:
        """Settle the records kept in ``volume_path``; the caller holds the volume's append lock (so the
        file is current and nothing is appended meanwhile).  Those the index cannot tell about yet stay."""
        with self._lock:
            kept = self._kept.pop(volume_path, None)
        if not kept:
            return
        try:
            while kept:
                if not self._settle_one(kept[0]):
                    break
                kept.pop(0)
        finally:
            if kept:
                with self._lock:
                    self._kept.setdefault(volume_path, [])[:0] = kept

    def _settle_one(self, record: IndexedRecord) -> bool:
        placement = record.placement
        uid = record.attributes.sop_instance_uid
        took_effect = commit_took_effect(self._index, uid, placement.volume_path, placement.offset, 0.0)
        if took_effect is None:
            return False
        if took_effect:
            log.info("SOP Instance %s: the index commit that failed had taken effect; its record at %s offset %d "
                     "is archived", uid, placement.volume_path, placement.offset)
            return True
        with self._index.session() as session:
            indexed = upsert_instance(session, record.attributes, placement, self._level_cache, keep_existing=True)
            if indexed and record.pending_stem is not None:
                mark_compression_pending(session, record.pending_stem)
        if indexed:
            log.warning("SOP Instance %s: its index commit had not taken effect; its kept record at %s offset %d is "
                        "indexed now (its sender was answered A700; a re-send is a duplicate)", uid,
                        placement.volume_path, placement.offset)
        else:
            log.info("SOP Instance %s was stored again since its index commit failed; the record kept at %s offset "
                     "%d is a stale copy", uid, placement.volume_path, placement.offset)
        return True
