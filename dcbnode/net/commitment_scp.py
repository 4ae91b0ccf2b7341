"""The Storage Commitment Push Model SCP (PS3.4 Annex J), SOP Class 1.2.840.10008.1.20.1.

* **N-ACTION** (Action Type 1, Request Storage Commitment) is answered at once: the request is checked
  (well-known SOP Instance, Transaction UID, Referenced SOP Sequence, a requesting AE known in
  ``[peers]``) and kept in the index (:class:`~dcbnode.archive.commitment.CommitmentQueue`) before
  Success is sent, so it is answered even if the node stops right after.
* **N-EVENT-REPORT**: each referenced instance is checked (:func:`~dcbnode.archive.commitment.assess`:
  indexed, i.e. fsynced and committed, of the named class, every checksum of its record right); Event Type
  1 when all are, else 2 with the Failed SOP Sequence and a Failure Reason per instance (J.3.3).  The
  report goes on the requesting association once the N-ACTION response has left, if the requestor has not
  asked to release it; otherwise the :class:`CommitmentService` thread sends it on a new association to
  the requestor's ``[peers]`` entry, proposing the SCP role (J.3.3.1.3), and retries every
  ``[storage] commitment_retry_interval`` seconds until a response comes back.  Requests left by a
  stopped or killed node are sent after its restart.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
from sqlalchemy.exc import DBAPIError

from ..archive.commitment import CommitmentQueue, CommitmentResult, PendingCommitment, Reference, assess
from ..dcbs import is_valid_uid
from ..index.database import OutageNotice
from .access import operation_refusal
from .context import NodeContext
from .store_scp import status

__all__ = ["CommitmentService", "report_dataset"]

log = logging.getLogger("dcbnode.commitment")

REQUEST_STORAGE_COMMITMENT: Final = 1  #: Action Type ID (PS3.4 J.3.2)
EVENT_SUCCESSFUL, EVENT_FAILURES_EXIST = 1, 2  #: Event Type IDs (PS3.4 J.3.3)
# N-ACTION response statuses (PS3.7 10.1.4.1.10)
_SUCCESS, _PROCESSING_FAILURE, _NO_SUCH_INSTANCE = 0x0000, 0x0110, 0x0112
_INVALID_ARGUMENT, _NO_SUCH_ACTION, _MISSING_ATTRIBUTE, _RESOURCE_LIMITATION = 0x0115, 0x0123, 0x0120, 0x0213
#: How long a new request is left to the attempt on the requesting association before the sender thread
#: may take it (it takes it at once when that attempt fails; this only matters if the attempt never ends).
_SAME_ASSOCIATION_HOLD = 30.0
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
            # Held back from the sender thread while the report is tried on this association.
            request_id = self.queue.add(transaction, calling, references, hold=_SAME_ASSOCIATION_HOLD)
        except Exception:
            log.exception("storage commitment request %s from %s cannot be kept", transaction, calling)
            return status(_RESOURCE_LIMITATION, "the request cannot be recorded; retry later")
        log.info("storage commitment request %s from %s: %d instance(s), status 0x0000", transaction, calling,
                 len(references))
        _SameAssociation(self, event.assoc, int(request.MessageID), request_id).watch()
        return _SUCCESS

    # -- delivery ----------------------------------------------------------------------------------------

    def report_on(self, assoc: Association, request_id: int) -> None:
        """Send the report of ``request_id`` on ``assoc`` (the requestor's, the N-ACTION response sent);
        hand it to the sender thread if the association is ending or the report goes unanswered."""
        pending = self.queue.claim(request_id)
        if pending is None:  # the sender thread has it already
            return
        delivered = False
        try:
            event_type, information = self._report(pending)
            delivered = _send_on(assoc, event_type, information, pending, "same association")
        finally:
            self._settle(pending, delivered, retry_in=0.0)
            if not delivered:
                self.wake()

    def wake(self) -> None:
        """Make the sender thread look for requests to deliver now."""
        self._wake.set()

    def _report(self, pending: PendingCommitment) -> tuple[int, Dataset]:
        result = assess(self.context.archive, pending.transaction_uid, pending.references)
        return report_dataset(result, self.context.config.node.ae_title)

    def _settle(self, pending: PendingCommitment, delivered: bool, retry_in: float) -> None:
        if delivered:
            self.queue.finish(pending.id)
        else:
            self.queue.release(pending.id, retry_in)

    def deliver(self, request_id: int) -> None:
        """Claim ``request_id`` and send its report on a new association to the requestor."""
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
        node = config.node
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout, ae.dimse_timeout = node.acse_timeout, node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # PS3.4 J.3.3.1.3: the report's sender is the association requestor acting as SCP.
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        delivered = False
        retry = config.storage.commitment_retry_interval
        try:
            if assoc.is_established:
                try:
                    event_type, information = self._report(pending)
                    delivered = _send_on(assoc, event_type, information, pending, "new association")
                finally:
                    if assoc.is_established:
                        assoc.release()
            if not delivered:
                log.warning("storage commitment %s: report to %s at %s:%d not delivered (attempt %d); retrying "
                            "in %g s", pending.transaction_uid, peer.ae_title, peer.host, peer.port,
                            pending.attempts + 1, retry)
        finally:
            self._settle(pending, delivered, retry_in=retry)

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
    watcher = _ReleaseWatcher(assoc)
    assoc.bind(evt.EVT_PDU_RECV, watcher.pdu_received)
    try:
        if not assoc.is_established or watcher.release_queued():
            return False
        reply, _ = assoc.send_n_event_report(information, event_type, StorageCommitmentPushModel,
                                             StorageCommitmentPushModelInstance)
    finally:
        assoc.unbind(evt.EVT_PDU_RECV, watcher.pdu_received)
    code = getattr(reply, "Status", None)
    if code is None:
        return False
    failed = len(information.get("FailedSOPSequence", []))
    level = logging.INFO if code == 0 else logging.WARNING
    log.log(level, "storage commitment %s: report (event type %d: %d committed, %d failed) to %s on the %s, "
            "status 0x%04X", pending.transaction_uid, event_type, len(pending.references) - failed, failed,
            pending.calling_ae_title, how, code)
    return True


class _ReleaseWatcher:
    """Ends the wait for an N-EVENT-REPORT reply when the requestor asks to release the association.

    A requestor may release at any time after the N-ACTION response (PS3.4 J.3.2.1.2), and it does not
    answer a request then: without this, the wait would last the DIMSE timeout while the requestor waits
    for its release to be answered.  ``(None, None)`` on the DIMSE queue is how pynetdicom itself wakes a
    waiting request when the connection ends ("no reply").
    """

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def release_queued(self) -> bool:
        """Whether an A-RELEASE request waits for the association's reactor (peeked, not taken)."""
        primitive = self.assoc.dul.peek_next_pdu()
        return isinstance(primitive, A_RELEASE) and primitive.result is None

    def pdu_received(self, event: Event) -> None:
        """EVT_PDU_RECV (DUL thread)."""
        if isinstance(event.pdu, A_RELEASE_RQ):
            # pynetdicom then logs "DIMSE timeout reached" and aborts the association: the requestor's
            # release raced the report (PS3.4 J.3.3.1.2 Note 1); the report goes on a new association.
            log.info("%s released the association while the storage commitment report was on its way; "
                     "it is sent again on a new association", self.assoc.requestor.ae_title.strip())
            self.assoc.dimse.msg_queue.put((None, None))


class _SameAssociation:
    """Sends a request's report on the requesting association once its N-ACTION response has left."""

    def __init__(self, service: CommitmentService, assoc: Association, message_id: int, request_id: int) -> None:
        self.service, self.assoc, self.message_id, self.request_id = service, assoc, message_id, request_id

    def watch(self) -> None:
        self.assoc.bind(evt.EVT_DIMSE_SENT, self._sent)

    def _sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT, in the association's reactor thread, inside pynetdicom's N-ACTION service."""
        command: Any = event.message.command_set
        if type(event.message).__name__ != "N_ACTION_RSP" or command.MessageIDBeingRespondedTo != self.message_id:
            return
        # A thread of its own: the reactor must first leave the N-ACTION service, after which the report's
        # send pauses it (pynetdicom's send_* protocol), and unbinding inside the trigger is not safe.
        threading.Thread(target=self._report, name="dcbnode-commitment-report", daemon=True).start()

    def _report(self) -> None:
        self.assoc.unbind(evt.EVT_DIMSE_SENT, self._sent)
        try:
            self.service.report_on(self.assoc, self.request_id)
        except Exception:
            log.exception("storage commitment report on the requesting association failed")
