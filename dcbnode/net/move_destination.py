"""A C-MOVE destination that cannot be reached is answered as such, not as "Move Destination Unknown".

pynetdicom's C-MOVE SCP opens the sub-association itself once the handler has named the destination,
and answers ``A801`` (Refused: Move Destination unknown) whenever that association is not established.
For a destination that *is* configured in ``[peers]`` that sends the operator to the wrong place.  So:

* the handler binds a :class:`DestinationAttempt` to the sub-association's events: it learns whether
  the connection opened, whether the peer rejected the association (and with which A-ASSOCIATE-RJ), or
  accepted none of the presentation contexts proposed; a connection that never opened is diagnosed
  with one plain TCP connect, which gives the system's reason ("Connection refused", "timed out"…);
* the node's DIMSE provider (:class:`~.provider.NodeDIMSE`) passes every message it sends through
  :func:`answer_unreachable`: the final C-MOVE response pynetdicom sends as ``A801`` for a move with a
  recorded attempt goes out as :data:`DESTINATION_UNREACHABLE` with an Error Comment naming the peer,
  its address and the reason, and the node logs one line saying the same.

``A801`` stays for AE titles that are not in ``[peers]``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.events import Event

from ..config import PeerConfig
from .associations import reject_codes, reject_reason_name

__all__ = ["DESTINATION_UNREACHABLE", "DestinationAttempt", "MoveRefused", "answer_unreachable"]

log = logging.getLogger("dcbnode.retrieve")

#: C-MOVE final status "Failed: Unable to process" (PS3.4 C.4.2.1.5, Cxxx) chosen for "the configured
#: move destination could not be reached"; the Error Comment says which peer and why.
DESTINATION_UNREACHABLE = 0xC801
UNKNOWN_DESTINATION = 0xA801
_COMMENT_LENGTH = 64  #: Error Comment is LO
#: Seconds the diagnostic connect may take (only after pynetdicom's own connect failed).
_DIAGNOSTIC_TIMEOUT = 5.0


class DestinationAttempt:
    """What happened when pynetdicom associated with a configured C-MOVE destination."""

    def __init__(self, peer: PeerConfig, message_id: int) -> None:
        self.peer = peer
        self.message_id = message_id
        self.connected = False
        self.outcome = ""  #: why, in full (the log line)
        self.brief = ""  #: the same in a few words (the 64-character Error Comment)

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        """Notification handlers to bind to the sub-association (pynetdicom's ``evt_handlers``)."""
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_REJECTED, self._rejected),
                (evt.EVT_ABORTED, self._aborted)]

    def _opened(self, _event: Event) -> None:
        self.connected = True

    def _rejected(self, event: Event) -> None:
        sent = event.assoc.acceptor.primitive
        self.outcome = f"rejected the association (A-ASSOCIATE-RJ {reject_codes(sent)})"
        self.brief = f"rejected: {reject_reason_name(sent)}"

    def _aborted(self, event: Event) -> None:
        assoc = event.assoc
        refused = assoc.rejected_contexts
        if not self.connected:  # pynetdicom reports a failed connect as an abort too: reason() diagnoses it
            return
        if not assoc.accepted_contexts and refused:
            classes = ", ".join(sorted({str(context.abstract_syntax) for context in refused}))
            self.outcome = f"accepted none of the {len(refused)} presentation contexts proposed (SOP classes {classes})"
            self.brief = "accepted no presentation context"
        else:
            self.outcome = "aborted the association request, or did not answer it within node.acse_timeout"
            self.brief = "aborted or did not answer"

    def reason(self) -> str:
        """Why the destination could not be reached (then also in :attr:`brief`)."""
        if not self.outcome:
            self.outcome = self.brief = self._connection_failure()
        return self.outcome

    def _connection_failure(self) -> str:
        if self.connected:
            return "closed the connection during association negotiation"
        try:
            with socket.create_connection((self.peer.host, self.peer.port), timeout=_DIAGNOSTIC_TIMEOUT):
                return "could not connect (it accepted a connection a moment later: retry)"
        except OSError as exc:
            return f"could not connect: {exc.strerror or exc}"

    def comment(self) -> str:
        """The Error Comment (LO, 64 characters): the peer and :attr:`brief`, the port or host left out
        when the whole does not fit (the log line has everything)."""
        peer = self.peer
        for who in (self.address, f"{peer.ae_title}@{peer.host}", peer.ae_title):
            if len(who) + 1 + len(self.brief) <= _COMMENT_LENGTH:
                break
        return f"{who} {self.brief}"[:_COMMENT_LENGTH]

    @property
    def address(self) -> str:
        """``AET@host:port``."""
        return f"{self.peer.ae_title}@{self.peer.host}:{self.peer.port}"


@dataclass(frozen=True)
class MoveRefused:
    """A C-MOVE refused before any sub-association is opened (the peer may not move, see :mod:`.access`,
    or its identifier is refused): its final response carries ``status`` instead of pynetdicom's A801."""

    message_id: int
    status: Dataset


def answer_unreachable(assoc: Any, primitive: Any) -> None:
    """Called by the node's DIMSE provider (:class:`~.provider.NodeDIMSE`) for every message it sends: a
    C-MOVE response ``A801`` for a move with a recorded attempt becomes :data:`DESTINATION_UNREACHABLE`
    with the reason in its Error Comment, and one line is logged."""
    if not isinstance(primitive, C_MOVE) or primitive.Status != UNKNOWN_DESTINATION:
        return
    attempt = getattr(assoc, "dcbnode_move_attempt", None)
    if not isinstance(attempt, DestinationAttempt | MoveRefused) or \
            attempt.message_id != primitive.MessageIDBeingRespondedTo:
        return
    assoc.dcbnode_move_attempt = None
    if isinstance(attempt, MoveRefused):
        primitive.Status = attempt.status.Status
        primitive.ErrorComment = attempt.status.ErrorComment
        return
    reason = attempt.reason()
    log.warning("C-MOVE destination %s could not be reached: %s; answering 0x%04X",
                attempt.address, reason, DESTINATION_UNREACHABLE)
    primitive.Status = DESTINATION_UNREACHABLE
    primitive.ErrorComment = attempt.comment()
