"""The Storage Commitment Push Model SCP (PS3.4 Annex J), SOP Class 1.2.840.10008.1.20.1.

* **N-ACTION** (Action Type 1, Request Storage Commitment) is answered at once: the request is checked
  (well-known SOP Instance, Transaction UID, Referenced SOP Sequence, a requesting AE known in
  ``[peers]``) and kept in the index (:class:`~dcbnode.archive.commitment.CommitmentQueue`) before
  Success is sent, so it is answered even if the node stops right after.
* **N-EVENT-REPORT**: each referenced instance is checked (:func:`~dcbnode.archive.commitment.assess`:
  indexed, i.e. fsynced and committed, of the named class, every checksum of its record right); Event Type
  1 when all are, else 2 with the Failed SOP Sequence and a Failure Reason per instance (J.3.3).  The
  reports owed on a requesting association (:class:`_AssociationReports`) go there one at a time, in the
  order of the requests, each once its N-ACTION response has left, while the association's reactor keeps
  serving the requestor (:mod:`.replies`: its next N-ACTION is answered meanwhile).  A report that
  cannot go there (the requestor released the association, or did not answer) is handed to the
  :class:`CommitmentService` thread, which sends it on a new association to the requestor's ``[peers]``
  entry, proposing the SCP role (J.3.3.1.3); a failed delivery is tried again after ``[storage]
  commitment_retry_interval`` seconds, doubling up to ten times that, until a response comes back or
  the request is ``commitment_give_up_after`` seconds old (then it is dropped, with one error line).
  Requests left by a stopped or killed node are sent after its restart.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import uuid
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, Final, cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
from sqlalchemy.exc import DBAPIError

from ..archive.commitment import (
    CommitmentQueue,
    CommitmentResult,
    PendingCommitment,
    Reference,
    TransactionConflict,
    assess,
    duration_text,
    retry_delay,
)
from ..config import Config
from ..dcbs import is_valid_uid
from ..index.database import OutageNotice
from .access import operation_refusal
from .context import NodeContext
from .move_destination import DestinationAttempt
from .replies import send_request
from .store_scp import status

__all__ = ["CommitmentService", "report_dataset"]

log = logging.getLogger("dcbnode.commitment")

REQUEST_STORAGE_COMMITMENT: Final = 1  #: Action Type ID (PS3.4 J.3.2)
EVENT_SUCCESSFUL, EVENT_FAILURES_EXIST = 1, 2  #: Event Type IDs (PS3.4 J.3.3)
# N-ACTION response statuses (PS3.7 10.1.4.1.10)
_SUCCESS, _PROCESSING_FAILURE, _NO_SUCH_INSTANCE = 0x0000, 0x0110, 0x0112
_INVALID_ARGUMENT, _NO_SUCH_ACTION, _MISSING_ATTRIBUTE, _RESOURCE_LIMITATION = 0x0115, 0x0123, 0x0120, 0x0213
#: How often the sender looks for requests to deliver (and is woken sooner when one is handed to it).
_POLL_SECONDS = 1.0


def report_dataset(result: CommitmentResult, retrieve_ae_title: str) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information of the N-EVENT-REPORT for ``result`` (PS3.4 Table J.3-2)."""
    info = Dataset()
    info.TransactionUID = result.transaction_uid
    info.RetrieveAETitle = retrieve_ae_title

    def item(reference: Reference) -> Dataset:
        ds = Dataset()
        ds.ReferencedSOPClassUID = reference.sop_class_uid
        ds.ReferencedSOPInstanceUID = reference.sop_instance_uid
        return ds

    if result.committed:
        info.ReferencedSOPSequence = [item(reference) for reference in result.committed]
    if not result.failed:
        return EVENT_SUCCESSFUL, info
    failed = []
    for reference, reason in result.failed:
        entry = item(reference)
        entry.FailureReason = reason
        failed.append(entry)
    info.FailedSOPSequence = failed
    return EVENT_FAILURES_EXIST, info


def _references(information: Dataset) -> list[Reference] | Dataset:
    """The request's references, or the failure status to answer with."""
    if not is_valid_uid(str(information.get("TransactionUID", "") or "")):
        return status(_MISSING_ATTRIBUTE, "Transaction UID missing or not a valid UID")
    items = information.get("ReferencedSOPSequence") or []
    if not items:
        return status(_MISSING_ATTRIBUTE, "Referenced SOP Sequence missing or empty")
    references = []
    for item in items:
        reference = Reference(str(item.get("ReferencedSOPClassUID", "") or ""),
                              str(item.get("ReferencedSOPInstanceUID", "") or ""))
        if not (is_valid_uid(reference.sop_class_uid) and is_valid_uid(reference.sop_instance_uid)):
            return status(_INVALID_ARGUMENT, "a Referenced SOP Sequence item lacks valid UIDs")
        references.append(reference)
    return references


class CommitmentService:
    """The node's Storage Commitment SCP: the N-ACTION handler and the thread that delivers reports."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        node = context.config.node
        # A claim outlives one delivery attempt (association, request, reply and release) by a margin.
        lease = 2 * (node.acse_timeout + node.dimse_timeout) + 60
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = CommitmentQueue(context.archive.index, owner, lease)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dcbnode-commitment", daemon=True)

    # -- N-ACTION --------------------------------------------------------------------------------------

    def handle_n_action(self, event: Event) -> tuple[Dataset | int, Dataset | None]:
        """``evt.EVT_N_ACTION`` handler: keep the request, answer at once, report after the response."""
        calling = event.assoc.requestor.ae_title.strip()
        outcome = self._accept(event, calling)
        if isinstance(outcome, Dataset):
            log.warning("storage commitment request from %s refused: 0x%04X %s", calling, outcome.Status,
                        outcome.ErrorComment)
        return outcome, None

    def _accept(self, event: Event, calling: str) -> Dataset | int:
        refused = operation_refusal(event, self.context, "commit")
        if refused is not None:
            return refused
        request = event.request
        if str(request.RequestedSOPInstanceUID) != StorageCommitmentPushModelInstance:
            return status(_NO_SUCH_INSTANCE, "Requested SOP Instance is not 1.2.840.10008.1.20.1.1")
        if event.action_type != REQUEST_STORAGE_COMMITMENT:
            return status(_NO_SUCH_ACTION, "Action Type ID must be 1 (Request Storage Commitment)")
        try:
            information = event.action_information
        except Exception:  # pynetdicom decodes on access; a malformed data set raises anything
            log.warning("storage commitment request from %s: undecodable Action Information", calling,
                        exc_info=True)
            return status(_INVALID_ARGUMENT, "Action Information cannot be decoded")
        references = _references(information)
        if isinstance(references, Dataset):
            return references
        if calling not in self.context.config.peers:
            return status(_PROCESSING_FAILURE, f"calling AE {calling} is not in the node's [peers]")
        transaction = str(information.TransactionUID)
        try:
            admission = self.queue.admit(transaction, calling, references)
        except TransactionConflict as conflict:
            return status(_INVALID_ARGUMENT, f"{conflict}; use a new one")
        except Exception:
            log.exception("storage commitment request %s from %s cannot be kept", transaction, calling)
            return status(_RESOURCE_LIMITATION, "the request cannot be recorded; retry later")
        if not admission.repeat:
            log.info("storage commitment request %s from %s: %d instance(s), status 0x0000", transaction, calling,
                     len(references))
        elif admission.pending is not None:
            log.info("storage commitment request %s from %s repeats a pending one: status 0x0000, one report",
                     transaction, calling)
        else:
            log.info("storage commitment request %s from %s repeats a pending one whose report is being sent "
                     "right now: status 0x0000, no second report", transaction, calling)
        if admission.pending is not None:
            _AssociationReports.of(self, event.assoc).owe(int(request.MessageID), admission.pending)
        return _SUCCESS

    # -- delivery ----------------------------------------------------------------------------------------

    def report_here(self, assoc: Association, pending: PendingCommitment) -> bool:
        """Send the report of ``pending`` (claimed by this process) on ``assoc``, the requestor's
        association, its N-ACTION response sent; True if the requestor answered it.  Otherwise the
        request is handed to the sender thread (a new association)."""
        delivered = False
        try:
            if self.queue.renew(pending.id):  # else dropped, or taken over by another sender
                event_type, information = self._report(pending)
                delivered = _send_on(assoc, event_type, information, pending, "same association")
        finally:
            self.hand_over(pending, delivered)
        return delivered

    def hand_over(self, pending: PendingCommitment, delivered: bool) -> None:
        """Forget a delivered request; give one whose report did not reach the requesting association to
        the sender thread, at once and without counting an attempt."""
        if delivered:
            self.queue.finish(pending.id)
        else:
            self.queue.release(pending.id, 0.0, "the requesting association ended before the report could be "
                               "sent on it", attempted=False)
            self.wake()

    def wake(self) -> None:
        """Make the sender thread look for requests to deliver now."""
        self._wake.set()

    def _report(self, pending: PendingCommitment) -> tuple[int, Dataset]:
        result = assess(self.context.archive, pending.transaction_uid, pending.references)
        return report_dataset(result, self.context.config.node.ae_title)

    def deliver(self, request_id: int) -> None:
        """Claim ``request_id`` and send its report on a new association to the requestor; after a failure,
        try again later (backing off) or give up once ``commitment_give_up_after`` has passed."""
        pending = self.queue.claim(request_id)
        if pending is None:
            return
        config = self.context.config  # read once: SIGHUP may swap it
        peer = config.peers.get(pending.calling_ae_title)
        if peer is None:
            log.error("storage commitment %s: %s is no longer in [peers]; its report cannot be sent, "
                      "the request is dropped", pending.transaction_uid, pending.calling_ae_title)
            self.queue.finish(pending.id)
            return
        error = "the report could not be prepared (see the error above)"
        try:
            error = self._send_new_association(pending, config)
        finally:
            if not error:
                self.queue.finish(pending.id)
            else:
                self._failed(pending, config, error)

    def _send_new_association(self, pending: PendingCommitment, config: Config) -> str:
        """Associate with the requestor and send the report; "" once it answered, else why not."""
        node, peer = config.node, config.peers[pending.calling_ae_title]
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout, ae.dimse_timeout = node.acse_timeout, node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        attempt = DestinationAttempt(peer, 0)  # says why an association failed
        # PS3.4 J.3.3.1.3: the report's sender is the association requestor acting as SCP.
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=attempt.handlers,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        if not assoc.is_established:
            return attempt.reason()
        try:
            event_type, information = self._report(pending)
            if _send_on(assoc, event_type, information, pending, "new association"):
                return ""
            return (f"no answer to the report within node.dimse_timeout ({node.dimse_timeout:g} s)"
                    if assoc.is_established else "the association ended before the report was answered")
        finally:
            if assoc.is_established:
                assoc.release()

    def _failed(self, pending: PendingCommitment, config: Config, error: str) -> None:
        """After a failed delivery: try again after the back-off, or give up once the request is older
        than ``commitment_give_up_after`` (the last attempt is made at that age)."""
        storage, peer = config.storage, config.peers[pending.calling_ae_title]
        attempts = pending.attempts + 1
        age = (datetime.now(UTC).replace(tzinfo=None) - pending.received_at).total_seconds()
        left = storage.commitment_give_up_after - age
        where = f"to {peer.ae_title} at {peer.host}:{peer.port}"
        if left <= 0:
            log.error("storage commitment %s: report %s given up after %s and %d attempt(s) (the request came "
                      "%s UTC; last error: %s); the request is dropped, the modality must ask again "
                      "([storage] commitment_give_up_after = %g s)", pending.transaction_uid, where,
                      duration_text(age), attempts, f"{pending.received_at:%Y-%m-%d %H:%M:%S}", error,
                      storage.commitment_give_up_after)
            self.queue.finish(pending.id)
            return
        retry = min(retry_delay(attempts, storage.commitment_retry_interval), left)
        log.warning("storage commitment %s: report %s not delivered (attempt %d): %s; retrying in %s",
                    pending.transaction_uid, where, attempts, error, duration_text(retry))
        self.queue.release(pending.id, retry, error)

    # -- the sender thread --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering pending reports (those left by an earlier run too)."""
        freed = self.queue.release_abandoned(_process_gone)
        if freed:
            log.info("%d storage commitment report(s) a stopped node process was sending are sent again", freed)
        waiting = self.queue.count()
        if waiting:
            log.info("%d storage commitment request(s) wait for their report", waiting)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the thread after the delivery in progress; False if it did not end within ``timeout``."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        outage = OutageNotice(log, "storage commitment delivery")
        while not self._stopping.is_set():
            self._wake.wait(_POLL_SECONDS)
            self._wake.clear()
            try:
                for request_id in self.queue.due():
                    if self._stopping.is_set():
                        return
                    self.deliver(request_id)
                outage.succeeded()
            except DBAPIError as exc:  # the index is down: said once, not a traceback every round
                outage.failed(exc)
            except Exception:  # never let the thread die: the next round tries again
                log.exception("storage commitment delivery failed")


def _process_gone(owner: str) -> bool:
    """Whether the sender ``owner`` (``host:pid:random``) was a process of this host that has ended.

    A process with that pid that is this very process is another incarnation (a container restarted
    with the same pid): the random part differs, so the claim is not ours and its owner is gone.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's node (PostgreSQL): its claim expires with the lease
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _send_on(assoc: Association, event_type: int, information: Dataset, pending: PendingCommitment,
             how: str) -> bool:
    """Send one N-EVENT-REPORT on ``assoc``; True if the peer answered it."""
    if not assoc.is_established or _release_queued(assoc):
        return False
    if how == "same association":
        code = _report_on_accepted(assoc, event_type, information)
    else:
        reply, _ = assoc.send_n_event_report(information, event_type, StorageCommitmentPushModel,
                                             StorageCommitmentPushModelInstance)
        code = getattr(reply, "Status", None)
    if code is None:
        return False
    failed = len(information.get("FailedSOPSequence", []))
    level = logging.INFO if code == 0 else logging.WARNING
    log.log(level, "storage commitment %s: report (event type %d: %d committed, %d failed) to %s on the %s, "
            "status 0x%04X", pending.transaction_uid, event_type, len(pending.references) - failed, failed,
            pending.calling_ae_title, how, code)
    return True


def _release_queued(assoc: Association) -> bool:
    """Whether the requestor has asked to release ``assoc`` (an A-RELEASE request waits for its reactor,
    peeked, not taken): a requestor may release at any time after the N-ACTION response (PS3.4 J.3.2.1.2),
    and does not answer a request then."""
    primitive = assoc.dul.peek_next_pdu()
    return isinstance(primitive, A_RELEASE) and primitive.result is None


def _report_on_accepted(assoc: Association, event_type: int, information: Dataset) -> int | None:
    """Send the N-EVENT-REPORT on an association the node accepted, its reactor serving the requestor
    meanwhile (:func:`~.replies.send_request`); the reply's status, None without one (no reply within
    the DIMSE timeout, or the requestor released or aborted the association first)."""
    context = assoc._get_valid_context(StorageCommitmentPushModel, "", None)
    syntax = context.transfer_syntax[0]
    request = N_EVENT_REPORT()
    request.AffectedSOPClassUID = StorageCommitmentPushModel
    request.AffectedSOPInstanceUID = StorageCommitmentPushModelInstance
    request.EventTypeID = event_type
    request.EventInformation = BytesIO(encode(information, syntax.is_implicit_VR, syntax.is_little_endian,
                                              syntax.is_deflated))
    reply = send_request(assoc, request, cast(int, context.context_id), assoc.dimse_timeout)
    if reply is None:
        if assoc.is_established:
            log.warning("%s did not answer the storage commitment report within node.dimse_timeout; it is "
                        "sent again on a new association", assoc.requestor.ae_title.strip())
        else:
            log.info("%s ended the association while the storage commitment report was on its way; it is "
                     "sent again on a new association", assoc.requestor.ae_title.strip())
        return None
    return getattr(reply, "Status", None)


class _AssociationReports:
    """The reports owed on one association the node accepted.

    Each is sent once its N-ACTION response has left (``EVT_DIMSE_SENT``, triggered while the DIMSE
    provider holds its send lock, so the report cannot overtake the response), one at a time (no
    asynchronous operations window is negotiated) and in the order of the requests, by a thread that
    lives while any is owed.  When the association ends, those not delivered go to the sender thread.
    """

    def __init__(self, service: CommitmentService, assoc: Association) -> None:
        self.service, self.assoc = service, assoc
        self._lock = threading.Lock()
        self._answering: dict[int, PendingCommitment] = {}  #: N-ACTION Message ID -> its request
        self._ready: collections.deque[PendingCommitment] = collections.deque()
        self._sending = False
        assoc.bind(evt.EVT_DIMSE_SENT, self._sent)
        assoc.bind(evt.EVT_CONN_CLOSE, self._closed)

    @classmethod
    def of(cls, service: CommitmentService, assoc: Association) -> _AssociationReports:
        """The association's (made on its first request; only its reactor thread calls this)."""
        reports = getattr(assoc, "dcbnode_commitment_reports", None)
        if reports is None:
            reports = assoc.dcbnode_commitment_reports = cls(service, assoc)  # type: ignore[attr-defined]
        return cast(_AssociationReports, reports)

    def owe(self, message_id: int, pending: PendingCommitment) -> None:
        """The report of ``pending`` is owed once the response to N-ACTION ``message_id`` has been sent."""
        with self._lock:
            self._answering[message_id] = pending

    def _sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT, in the association's reactor thread, inside the N-ACTION service."""
        if type(event.message).__name__ != "N_ACTION_RSP":
            return
        command: Any = event.message.command_set
        with self._lock:
            pending = self._answering.pop(int(command.MessageIDBeingRespondedTo), None)
            if pending is None:
                return
            self._ready.append(pending)
            if self._sending:
                return
            self._sending = True
        threading.Thread(target=self._send_all, name="dcbnode-commitment-report", daemon=True).start()

    def _send_all(self) -> None:
        while True:
            with self._lock:
                if not self._ready:
                    self._sending = False
                    return
                pending = self._ready.popleft()
            try:
                self.service.report_here(self.assoc, pending)
            except Exception:
                log.exception("storage commitment %s: report on the requesting association failed",
                              pending.transaction_uid)

    def _closed(self, _event: Event) -> None:
        """EVT_CONN_CLOSE: requests whose N-ACTION response never left go to the sender thread (those
        ready to send find the association closed and go there too)."""
        with self._lock:
            orphans = list(self._answering.values())
            self._answering.clear()
        for pending in orphans:
            try:
                self.service.hand_over(pending, delivered=False)
            except Exception:  # the index is down: the claim is freed at the next start, or when it expires
                log.exception("storage commitment %s: cannot hand the report over", pending.transaction_uid)
