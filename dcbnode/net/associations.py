"""One log line per association (who, from where, how it ended, how long, what it did) and one per
completed C-FIND, C-GET, C-MOVE and C-ECHO (status, counts, time).  C-STOREs log their own line, with
the SOP class, instance and syntax."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

log = logging.getLogger("dcbnode.association")


@dataclass
class AssociationStats:
    """Attached to each acceptor association as ``assoc.dcbnode_stats`` (pynetdicom lets objects carry
    attributes; a dict keyed by association would need its own locking and cleanup)."""

    address: str
    started: float = field(default_factory=time.monotonic)
    state: str = "connected"
    stores: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    #: per message ID: (start time, pending responses sent so far)
    operations: dict[int, list[float]] = field(default_factory=dict)
    #: why the association was rejected and the A-ASSOCIATE-RJ sent (set when it is)
    rejection: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, status: int) -> None:
        """Tally one C-STORE by outcome."""
        with self.lock:
            self.stores["ok" if status == 0 else "failed"] += 1

    def summary(self) -> str:
        """What the association did, e.g. ``C-STORE ok=7 failed=0, C-FIND 2``."""
        parts = [f"C-STORE ok={self.stores['ok']} failed={self.stores['failed']}"] if self.stores else []
        parts += [f"{name} {count}" for name, count in sorted(self.requests.items()) if name != "C-STORE"]
        return ", ".join(parts) or "no operations"


def _stats(event: Event) -> AssociationStats:
    stats = getattr(event.assoc, "dcbnode_stats", None)
    if stats is None:
        address = event.address
        stats = AssociationStats(address=f"{address[0]}:{address[1]}")
        event.assoc.dcbnode_stats = stats
    return stats


def _on_open(event: Event) -> None:
    _stats(event)


def _on_accepted(event: Event) -> None:
    _stats(event).state = "accepted"


def _on_rejected(event: Event) -> None:
    stats = _stats(event)
    stats.state = "rejected"
    stats.rejection = rejection_reason(event.assoc)


#: PS3.8 Table 9-21: A-ASSOCIATE-RJ result, source and reason/diag. values.
_RJ_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_RJ_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_RJ_REASONS = {
    1: {1: "no-reason-given", 2: "application-context-name-not-supported", 3: "calling-AE-title-not-recognized",
        7: "called-AE-title-not-recognized"},
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}


def rejection_reason(assoc: Association) -> str:
    """Why pynetdicom rejected ``assoc`` as acceptor, in the node's terms, and the A-ASSOCIATE-RJ it sent.

    pynetdicom keeps the A-ASSOCIATE-RJ it sent as ``assoc.acceptor.primitive`` and the request as
    ``assoc.requestor.primitive``; the reject codes say which of its checks failed (PS3.8 9.3.4).
    """
    sent, request = assoc.acceptor.primitive, assoc.requestor.primitive
    source, reason = getattr(sent, "result_source", None), getattr(sent, "diagnostic", None)
    called = str(getattr(request, "called_ae_title", "") or "").strip()
    calling = str(getattr(request, "calling_ae_title", "") or "").strip()
    ae = assoc.ae
    why = {
        (1, 3): f"calling AE title {calling!r} is not in [access] allowed_calling_aets",
        (1, 7): f"called AE title {called!r} is not ours ({ae.ae_title.strip()}); [access] require_called_aet is on",
        (2, 1): "user identity not accepted",
        (3, 2): f"association limit reached ({ae.maximum_associations} at once, node.max_associations)",
    }.get((source, reason), "rejected")
    # A rejection of dcbnode's own (access.PeerCheck) says why itself.
    why = getattr(assoc, "refusal", "") or why
    return f"{why} (A-ASSOCIATE-RJ {reject_codes(sent)})"


def reject_codes(primitive: object) -> str:
    """An A-ASSOCIATE-RJ's result, source and reason, with their PS3.8 names."""
    result, source, reason = (getattr(primitive, name, None) for name in ("result", "result_source", "diagnostic"))
    return (f"result {result} {_RJ_RESULTS.get(result, '?')}, source {source} {_RJ_SOURCES.get(source, '?')}, "
            f"reason {reason} {reject_reason_name(primitive)}")


def reject_reason_name(primitive: object) -> str:
    """The PS3.8 name of an A-ASSOCIATE-RJ's reason, e.g. ``called-AE-title-not-recognized``."""
    return _RJ_REASONS.get(getattr(primitive, "result_source", None), {}).get(
        getattr(primitive, "diagnostic", None), "?")


def _on_aborted(event: Event) -> None:
    _stats(event).state = "aborted"


def _on_released(event: Event) -> None:
    stats = _stats(event)
    if stats.state == "accepted":
        stats.state = "released"


def _on_close(event: Event) -> None:
    stats = _stats(event)
    assoc = event.assoc
    state = "closed without association" if stats.state == "connected" else stats.state
    if state == "accepted":  # the connection ended without A-RELEASE or A-ABORT
        state = "dropped"
    seconds = time.monotonic() - stats.started
    level = logging.WARNING if state in ("rejected", "aborted", "dropped") else logging.INFO
    log.log(level, "association %s from %s@%s (called %s) after %.2f s: %s",
            state, assoc.requestor.ae_title.strip() or "?", stats.address, _called_aet(assoc), seconds,
            stats.rejection or _refusal(assoc) or stats.summary())


#: Responses whose final (non-pending) instance ends an operation logged here.
_LOGGED_RESPONSES = {"C_FIND_RSP": "C-FIND", "C_GET_RSP": "C-GET", "C_MOVE_RSP": "C-MOVE", "C_ECHO_RSP": "C-ECHO"}
_PENDING = (0xFF00, 0xFF01)


def _on_dimse_recv(event: Event) -> None:
    """A request arrived: count it and start its clock."""
    name = type(event.message).__name__
    if not name.endswith("_RQ"):
        return
    stats = _stats(event)
    with stats.lock:
        stats.requests[name[:-3].replace("_", "-")] += 1
        stats.operations[int(event.message.command_set.MessageID)] = [time.monotonic(), 0]


def _on_dimse_sent(event: Event) -> None:
    """A response left: on the final one of a C-FIND/GET/MOVE/ECHO, log the operation."""
    operation = _LOGGED_RESPONSES.get(type(event.message).__name__)
    if operation is None:
        return
    command = event.message.command_set
    stats = _stats(event)
    with stats.lock:
        started = stats.operations.get(int(command.MessageIDBeingRespondedTo), [time.monotonic(), 0])
        if command.Status in _PENDING:
            started[1] += 1
            return
        stats.operations.pop(int(command.MessageIDBeingRespondedTo), None)
    counts = {"C-FIND": f", {int(started[1])} match(es)", "C-ECHO": ""}.get(operation) or _sub_operation_counts(command)
    comment = f" ({command.ErrorComment})" if "ErrorComment" in command else ""
    level = logging.INFO if command.Status in (0x0000, 0xFE00) else logging.WARNING
    log.log(level, "%s from %s: status 0x%04X%s%s, %.0f ms", operation,
            event.assoc.requestor.ae_title.strip() or "?", command.Status, comment, counts,
            (time.monotonic() - started[0]) * 1000)


def _sub_operation_counts(command: object) -> str:
    if "NumberOfCompletedSuboperations" not in command:
        return ""
    # A final response after a cancel or an abort may leave sub-operations never attempted.
    remaining = command.get("NumberOfRemainingSuboperations") or 0
    return (f", completed {command.NumberOfCompletedSuboperations}, failed "
            f"{command.get('NumberOfFailedSuboperations', 0)}, warning "
            f"{command.get('NumberOfWarningSuboperations', 0)}" + (f", not attempted {remaining}" if remaining else ""))


#: Notification handlers to bind on the server.
ASSOCIATION_HANDLERS = [
    (evt.EVT_CONN_OPEN, _on_open),
    (evt.EVT_ACCEPTED, _on_accepted),
    (evt.EVT_REJECTED, _on_rejected),
    (evt.EVT_ABORTED, _on_aborted),
    (evt.EVT_RELEASED, _on_released),
    (evt.EVT_CONN_CLOSE, _on_close),
    (evt.EVT_DIMSE_RECV, _on_dimse_recv),
    (evt.EVT_DIMSE_SENT, _on_dimse_sent),
]


def _refusal(assoc: object) -> str:
    """What the peer did wrong at the protocol level (garbage, a PDU too long, too slow), if anything."""
    refusal = getattr(assoc, "refusal", "")
    return f"{refusal}: connection closed" if refusal else ""


def _called_aet(assoc: object) -> str:
    """The called AE title from the A-ASSOCIATE-RQ (present even when the request was rejected)."""
    primitive = getattr(getattr(assoc, "requestor", None), "primitive", None)
    called = getattr(primitive, "called_ae_title", None)
    return called.strip() if isinstance(called, str) else "?"
