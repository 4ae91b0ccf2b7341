"""Storage Commitment (PS3.4 Annex J) without the network: the requests waiting for their report, kept in
the index, and the assessment of what a request references.

A request is written (:meth:`CommitmentQueue.add`) before its N-ACTION is answered and deleted
(:meth:`CommitmentQueue.finish`) once its N-EVENT-REPORT was delivered, so a request the node accepted is
answered even after a crash.  Whoever sends a report first claims the request with one conditional
``UPDATE`` (``claimed_by`` set only where it is free, or where the claim is older than the lease: its
sender died), so several node processes sharing one index never send the same report twice at once, and
a claim left by a killed process is taken over once its lease has expired.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, update

from ..dcbs import DcbsError
from ..index import Index
from ..index.models import CommitmentRequest
from .archive import Archive
from .verification import verify_instance

__all__ = ["CLASS_INSTANCE_CONFLICT", "NO_SUCH_OBJECT_INSTANCE", "PROCESSING_FAILURE", "CommitmentQueue",
           "CommitmentResult", "PendingCommitment", "Reference", "assess"]

log = logging.getLogger("dcbnode.commitment")

#: Failure Reason (0008,1197) values, PS3.4 J.3.3 / PS3.7 C: the record is damaged or unreadable.
PROCESSING_FAILURE = 0x0110
#: the instance was never stored (or was deleted)
NO_SUCH_OBJECT_INSTANCE = 0x0112
#: the instance is stored, but under another SOP class than the request names
CLASS_INSTANCE_CONFLICT = 0x0119


@dataclass(frozen=True, slots=True)
class Reference:
    """One referenced SOP instance of a request."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class CommitmentResult:
    """What the report says: the instances the archive commits to, and the others with their reason."""

    transaction_uid: str
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PendingCommitment:
    """A request whose report is still to be delivered, as claimed by one sender."""

    id: int
    transaction_uid: str
    calling_ae_title: str
    references: tuple[Reference, ...]
    attempts: int


def assess(archive: Archive, transaction_uid: str, references: Iterable[Reference]) -> CommitmentResult:
    """Check each referenced instance: stored, durable, of the named class, every checksum right."""
    result = CommitmentResult(transaction_uid)
    for reference in references:
        try:
            stored_class = verify_instance(archive, reference.sop_instance_uid)
        except KeyError:
            result.failed.append((reference, NO_SUCH_OBJECT_INSTANCE))
            continue
        except (DcbsError, OSError) as exc:
            log.error("storage commitment %s: instance %s cannot be read back: %s", transaction_uid,
                      reference.sop_instance_uid, exc)
            result.failed.append((reference, PROCESSING_FAILURE))
            continue
        if stored_class != reference.sop_class_uid:
            result.failed.append((reference, CLASS_INSTANCE_CONFLICT))
        else:
            result.committed.append(reference)
    return result


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


_TABLE = CommitmentRequest.__table__


class CommitmentQueue:
    """The ``commitment_requests`` table, seen by one sender ``owner`` (unique per process).

    ``lease``: seconds after which a claim counts as abandoned (longer than one delivery can take).
    """

    def __init__(self, index: Index, owner: str, lease: float) -> None:
        self.index = index
        self.owner = owner
        self.lease = timedelta(seconds=lease)

    def add(self, transaction_uid: str, calling_ae_title: str, references: Sequence[Reference],
            hold: float = 0.0) -> int:
        """Keep a new request (committed when this returns); its id.  :meth:`due` offers it only after
        ``hold`` seconds (:meth:`claim` takes it at once)."""
        now = _now()
        row = CommitmentRequest(
            transaction_uid=transaction_uid, calling_ae_title=calling_ae_title,
            references=json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in references]),
            received_at=now, not_before=now + timedelta(seconds=hold), attempts=0)
        with self.index.session() as session:
            session.add(row)
            session.flush()
            return int(row.id)

    def claim(self, request_id: int) -> PendingCommitment | None:
        """Take the request ``request_id`` if nobody holds it; None if somebody does, or it is gone."""
        now = _now()
        claimable = or_(_TABLE.c.claimed_by.is_(None), _TABLE.c.claimed_at < now - self.lease)
        with self.index.session() as session:
            taken = session.execute(update(_TABLE).where(_TABLE.c.id == request_id, claimable)
                                    .values(claimed_by=self.owner, claimed_at=now))
            if taken.rowcount != 1:
                return None
            row = session.execute(select(_TABLE).where(_TABLE.c.id == request_id)).one()
        references = tuple(Reference(str(c), str(i)) for c, i in json.loads(row.references))
        return PendingCommitment(row.id, row.transaction_uid, row.calling_ae_title, references, row.attempts)

    def due(self, limit: int = 16) -> list[int]:
        """Ids of requests a sender may claim now: free and past their retry time, or abandoned."""
        now = _now()
        free = and_(_TABLE.c.claimed_by.is_(None), _TABLE.c.not_before <= now)
        with self.index.session() as session:
            rows = session.execute(select(_TABLE.c.id).where(or_(free, _TABLE.c.claimed_at < now - self.lease))
                                   .order_by(_TABLE.c.id).limit(limit))
            return [int(request_id) for (request_id,) in rows]

    def release(self, request_id: int, retry_in: float) -> None:
        """Give a claimed request back, to be tried again in ``retry_in`` seconds."""
        with self.index.session() as session:
            session.execute(update(_TABLE).where(_TABLE.c.id == request_id, _TABLE.c.claimed_by == self.owner)
                            .values(claimed_by=None, claimed_at=None, attempts=_TABLE.c.attempts + 1,
                                    not_before=_now() + timedelta(seconds=retry_in)))

    def finish(self, request_id: int) -> None:
        """The report was delivered (or the request cannot ever be answered): forget the request."""
        with self.index.session() as session:
            session.execute(delete(_TABLE).where(_TABLE.c.id == request_id, _TABLE.c.claimed_by == self.owner))

    def release_abandoned(self, is_gone: Callable[[str], bool]) -> int:
        """Free the claims of every owner ``is_gone`` says has ended (a process killed mid-delivery), so
        their requests need not wait for the lease; how many were freed."""
        with self.index.session() as session:
            owners = session.execute(select(_TABLE.c.claimed_by).where(_TABLE.c.claimed_by.is_not(None))
                                     .distinct()).scalars().all()
            freed = 0
            for owner in owners:
                if owner != self.owner and is_gone(owner):
                    freed += session.execute(update(_TABLE).where(_TABLE.c.claimed_by == owner)
                                             .values(claimed_by=None, claimed_at=None)).rowcount
            return freed

    def count(self) -> int:
        """Requests not yet answered."""
        with self.index.session() as session:
            return int(session.scalar(select(func.count()).select_from(_TABLE)) or 0)
