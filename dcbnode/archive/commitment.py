"""Storage Commitment (PS3.4 Annex J) without the network: the requests waiting for their report, kept in
the index, and the assessment of what a request references.

A request is written (:meth:`CommitmentQueue.admit`) before its N-ACTION is answered and deleted
(:meth:`CommitmentQueue.finish`) once its N-EVENT-REPORT was delivered, so a request the node accepted is
answered even after a crash.  It is written claimed by the process that received it (which tries its
report on the requesting association); any other sender claims a request with one conditional ``UPDATE``
(``claimed_by`` set only where it is free, or where the claim is older than the lease: its sender died),
so several node processes sharing one index never send the same report twice at once, and a claim left
by a killed process is taken over once its lease has expired.

A request that repeats the Transaction UID of one still pending, from the same AE with the same
references, is the same request asked again (a requestor that did not get its report in time): it is
not kept twice.  The same Transaction UID with other references or from another AE is refused
(:class:`TransactionConflict`): its report could not be told apart from the pending one's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from ..dcbs import DcbsError
from ..index import Index
from ..index.models import CommitmentRequest
from .archive import Archive
from .verification import verify_instance

__all__ = ["CLASS_INSTANCE_CONFLICT", "NO_SUCH_OBJECT_INSTANCE", "PROCESSING_FAILURE", "Admission",
           "CommitmentQueue", "CommitmentResult", "PendingCommitment", "Reference", "TransactionConflict",
           "WaitingRequest", "assess", "drop_requests", "duration_text", "retry_delay", "waiting_requests"]

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
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`CommitmentQueue.admit` did with a request."""

    #: the request, claimed by the admitting sender (its report is that sender's to send); None when it
    #: repeats a pending request another sender is delivering right now
    pending: PendingCommitment | None
    #: it repeats a pending request (same Transaction UID, AE and references): nothing new was kept
    repeat: bool


class TransactionConflict(Exception):
    """The Transaction UID is pending for a request from another AE or with other references."""


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


def retry_delay(attempts: int, interval: float) -> float:
    """Seconds before the next delivery after ``attempts`` failed ones: ``interval``, doubling after each
    further failure, at most ten times ``interval``."""
    return min(interval * 2 ** min(max(attempts - 1, 0), 4), 10 * interval)


_UNITS = (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1))


def duration_text(seconds: float) -> str:
    """A duration for people: ``4.2 s``, ``12 min 3 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    name, size, smaller, small_size = next(unit for unit in _UNITS if seconds >= unit[1])
    return f"{int(seconds // size)} {name} {int(seconds % size // small_size)} {smaller}"


_TABLE = CommitmentRequest.__table__
#: ``last_error`` is cut to this many characters.
_ERROR_LENGTH = 500


def _decode(references: str) -> list[Reference]:
    return [Reference(str(sop_class), str(sop_instance)) for sop_class, sop_instance in json.loads(references)]


def _pending(row: Any) -> PendingCommitment:
    return PendingCommitment(int(row.id), row.transaction_uid, row.calling_ae_title, tuple(_decode(row.references)),
                             int(row.attempts), row.received_at)


class CommitmentQueue:
    """The ``commitment_requests`` table, seen by one sender ``owner`` (unique per process).

    ``lease``: seconds after which a claim counts as abandoned (longer than one delivery can take).
    """

    def __init__(self, index: Index, owner: str, lease: float) -> None:
        self.index = index
        self.owner = owner
        self.lease = timedelta(seconds=lease)

    def admit(self, transaction_uid: str, calling_ae_title: str, references: Sequence[Reference]) -> Admission:
        """Keep a new request (committed when this returns), claimed by this sender; or take up the pending
        request it repeats.  Raises :class:`TransactionConflict` (nothing kept) when the Transaction UID is
        pending with another AE or other references."""
        now = _now()
        with self.index.session() as session:
            rows = session.execute(select(_TABLE).where(_TABLE.c.transaction_uid == transaction_uid)
                                   .order_by(_TABLE.c.id)).all()
            for row in rows:
                if row.calling_ae_title != calling_ae_title:
                    raise TransactionConflict("Transaction UID pending for another AE")
                if set(_decode(row.references)) != set(references):
                    raise TransactionConflict("Transaction UID pending with other references")
            if rows:
                taken = session.execute(update(_TABLE).where(_TABLE.c.id == rows[0].id, self._claimable(now))
                                        .values(claimed_by=self.owner, claimed_at=now)).rowcount == 1
                return Admission(_pending(rows[0]) if taken else None, repeat=True)
            row = CommitmentRequest(
                transaction_uid=transaction_uid, calling_ae_title=calling_ae_title,
                references=json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in references]),
                received_at=now, not_before=now, attempts=0, claimed_by=self.owner, claimed_at=now)
            session.add(row)
            session.flush()
            return Admission(PendingCommitment(int(row.id), transaction_uid, calling_ae_title, tuple(references), 0,
                                               now), repeat=False)

    def _claimable(self, now: datetime) -> Any:
        return or_(_TABLE.c.claimed_by.is_(None), _TABLE.c.claimed_at < now - self.lease)

    def claim(self, request_id: int) -> PendingCommitment | None:
        """Take the request ``request_id`` if nobody holds it; None if somebody does, or it is gone."""
        now = _now()
        with self.index.session() as session:
            taken = session.execute(update(_TABLE).where(_TABLE.c.id == request_id, self._claimable(now))
                                    .values(claimed_by=self.owner, claimed_at=now))
            if taken.rowcount != 1:
                return None
            return _pending(session.execute(select(_TABLE).where(_TABLE.c.id == request_id)).one())

    def renew(self, request_id: int) -> bool:
        """Renew this sender's claim on ``request_id`` (its lease starts again); False if it holds it no
        longer (the lease expired and another sender took it, or an administrator dropped it)."""
        with self.index.session() as session:
            return session.execute(update(_TABLE).where(_TABLE.c.id == request_id, _TABLE.c.claimed_by == self.owner)
                                   .values(claimed_at=_now())).rowcount == 1

    def due(self, limit: int = 16) -> list[int]:
        """Ids of requests a sender may claim now: free and past their retry time, or abandoned."""
        now = _now()
        free = and_(_TABLE.c.claimed_by.is_(None), _TABLE.c.not_before <= now)
        with self.index.session() as session:
            rows = session.execute(select(_TABLE.c.id).where(or_(free, _TABLE.c.claimed_at < now - self.lease))
                                   .order_by(_TABLE.c.id).limit(limit))
            return [int(request_id) for (request_id,) in rows]

    def release(self, request_id: int, retry_in: float, error: str, *, attempted: bool = True) -> None:
        """Give a claimed request back, to be tried again in ``retry_in`` seconds; ``error`` says why it
        was not delivered; ``attempted``: a delivery was tried (and failed), not just handed over unsent."""
        with self.index.session() as session:
            session.execute(update(_TABLE).where(_TABLE.c.id == request_id, _TABLE.c.claimed_by == self.owner)
                            .values(claimed_by=None, claimed_at=None, last_error=error[:_ERROR_LENGTH],
                                    attempts=_TABLE.c.attempts + (1 if attempted else 0),
                                    not_before=_now() + timedelta(seconds=retry_in)))

    def finish(self, request_id: int) -> None:
        """The report was delivered (or is given up): forget the request."""
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


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    """A request whose report has not been delivered yet, as ``dcbnode-admin commitments`` shows it."""

    transaction_uid: str
    calling_ae_title: str
    instances: int
    received_at: datetime  #: UTC
    attempts: int
    last_error: str | None
    next_attempt_at: datetime  #: UTC; the requesting association's attempt does not wait for it
    claimed_by: str | None  #: the sender delivering it right now (``host:pid:…``), None when none is

    def age(self, now: datetime | None = None) -> float:
        """Seconds since the request."""
        return ((now or _now()) - self.received_at).total_seconds()


def _waiting(row: Any) -> WaitingRequest:
    return WaitingRequest(row.transaction_uid, row.calling_ae_title, len(json.loads(row.references)), row.received_at,
                          int(row.attempts), row.last_error, row.not_before, row.claimed_by)


def waiting_requests(index: Index) -> list[WaitingRequest]:
    """Every request whose report is still to be delivered, oldest first."""
    with index.session() as session:
        rows = session.execute(select(_TABLE).order_by(_TABLE.c.received_at, _TABLE.c.id)).all()
    return [_waiting(row) for row in rows]


def drop_requests(index: Index, transaction_uid: str | None) -> list[WaitingRequest]:
    """Forget the waiting request(s) with ``transaction_uid`` (``None``: all): their reports are not sent
    (one being sent at this very moment may still arrive).  What was dropped."""
    with index.session() as session:
        query = select(_TABLE).order_by(_TABLE.c.received_at, _TABLE.c.id)
        if transaction_uid is not None:
            query = query.where(_TABLE.c.transaction_uid == transaction_uid)
        rows = session.execute(query).all()
        if rows:
            session.execute(delete(_TABLE).where(_TABLE.c.id.in_([row.id for row in rows])))
    return [_waiting(row) for row in rows]
