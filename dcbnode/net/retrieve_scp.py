"""The C-MOVE and C-GET SCPs (PS3.4 C.4.2, C.4.3): thin generators in pynetdicom's handler protocol.

The archive resolves the identifier (:mod:`dcbnode.archive.retrieve`), :mod:`dcbnode.net.transfer`
rebuilds each instance in the best form the receiver accepted, and pynetdicom sends the C-STOREs and the
Pending / final responses with their sub-operation counts.

* C-MOVE: the destination comes only from ``[peers]``; an unknown AE title is answered A801 before
  anything is sent, a configured one that cannot be reached C801 with the reason
  (:mod:`.move_destination`).  The sub-association proposes, per SOP class needed, HTJ2K Lossless, HTJ2K, Explicit
  and Implicit VR LE and the received syntax of lossy instances, one context each.
* C-GET: the requester's storage contexts with the SCP role decide the form per instance.
* C-CANCEL is answered FE00 before the next instance; a receiver that goes away (abort, dropped
  connection) makes every remaining instance a failed sub-operation without reading it or waiting for
  a reply, and the operation ends normally at once (:class:`_Receiver`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from ..archive.retrieve import RetrieveError, RetrieveMatch, find_retrieve_matches
from ..index.query import STATUS_IDENTIFIER_MISMATCH, STATUS_UNABLE_TO_PROCESS
from .access import operation_refusal
from .context import NodeContext
from .guard import MAX_RETRIEVE_IDENTIFIER, oversized_identifier
from .move_destination import DestinationAttempt, MoveRefused
from .tls import client_tls_args
from .transfer import accepted_storage_syntaxes, prepared_instances, storage_contexts

__all__ = ["handle_get", "handle_move", "no_delay"]

_MODELS = {
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
}
PENDING, CANCEL, UNKNOWN_DESTINATION = 0xFF00, 0xFE00, 0xA801
#: How long to wait for the sub-association's accept notification (it normally precedes our resumption).
_ACCEPT_WAIT = 10.0


def _status(status: int, comment: str) -> Dataset:
    failure = Dataset()
    failure.Status = status
    failure.ErrorComment = comment[:64]
    return failure


def _matches(event: Event, context: NodeContext) -> tuple[list[RetrieveMatch], Dataset | None]:
    """The instances to send, or a failure status dataset to answer with."""
    model = _MODELS.get(str(event.request.AffectedSOPClassUID))
    if model is None:
        return [], _status(STATUS_IDENTIFIER_MISMATCH, "Unsupported retrieve information model")
    oversized = oversized_identifier(event.request, MAX_RETRIEVE_IDENTIFIER)
    if oversized:
        return [], _status(STATUS_UNABLE_TO_PROCESS, oversized)
    try:
        identifier = event.identifier
    except Exception:  # undecodable identifier
        return [], _status(STATUS_IDENTIFIER_MISMATCH, "Identifier cannot be decoded")
    try:
        return find_retrieve_matches(context.archive.index, identifier, model), None
    except RetrieveError as error:
        context.log.info("retrieve refused: 0x%04X %s", error.status, error.comment)
        return [], _status(error.status, error.comment)


def no_delay(assoc: Association) -> None:
    """Switch off Nagle's algorithm on the association's socket (pynetdicom 3.0 never does).

    A C-STORE ends in a PDU smaller than the peer's maximum; with Nagle on, it waits for the ACK of the
    previous segment, which the receiver delays by up to 40 ms: ~25 instances/s whatever the data.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _sub_operations(event: Event, context: NodeContext, matches: Sequence[RetrieveMatch],
                    accepted: dict[str, frozenset[str]], alive: Callable[[], bool]) -> Iterator[tuple[int, Any]]:
    """Pending results carrying each rebuilt instance; Cancel as soon as the SCU asks for it."""
    preference = context.config.retrieve.syntax_preference
    for dataset in prepared_instances(context.archive, matches, accepted, alive=alive, preference=preference,
                                      rebuilds=context.rebuilds):
        if event.is_cancelled:
            context.log.info("retrieve cancelled by the SCU")
            yield CANCEL, None
            return
        yield PENDING, dataset


def handle_get(event: Event, context: NodeContext) -> Iterator[Any]:
    """EVT_C_GET handler: send the matches back over the requesting association."""
    refused = operation_refusal(event, context, "get")
    matches, failure = ([], refused) if refused is not None else _matches(event, context)
    if failure is not None:
        yield 1  # pynetdicom answers a failure only after a sub-operation count
        yield failure, None
        return
    yield len(matches)
    assoc = event.assoc
    no_delay(assoc)
    accepted = accepted_storage_syntaxes(assoc.accepted_contexts)
    context.log.info("C-GET of %d instance(s) by %s", len(matches), assoc.requestor.ae_title)
    receiver = _Receiver(assoc)
    assoc.bind(evt.EVT_CONN_CLOSE, receiver.connection_closed)
    try:
        yield from _sub_operations(event, context, matches, accepted, receiver.alive)
    finally:
        assoc.unbind(evt.EVT_CONN_CLOSE, receiver.connection_closed)


class _Receiver:
    """Watches the association the C-STOREs go over, so that none waits for a peer that has gone.

    pynetdicom's ``send_c_store`` waits up to ``dimse_timeout`` for the reply.  When the peer aborts or
    drops the connection, pynetdicom wakes the one C-STORE then waiting; a C-STORE started after that
    (before the association's reactor has marked it not established, or never: during a C-GET the
    reactor is busy running this handler) would wait the full timeout.  So: ``alive()`` turns false as
    soon as the connection closes (EVT_CONN_CLOSE, fired by pynetdicom's DUL thread) or an abort is
    queued, :mod:`.transfer` then yields only placeholders, which fail without sending; and the
    close handler wakes a C-STORE that raced past the check, the way pynetdicom itself does
    (``(None, None)`` on the DIMSE message queue reads as "no reply": the sub-operation fails).
    """

    def __init__(self, assoc: Association | None = None) -> None:
        self.assoc = assoc
        self.ready = threading.Event()
        self.closed = threading.Event()

    def accepted(self, event: Event) -> None:
        """EVT_ACCEPTED of the C-MOVE sub-association pynetdicom opens."""
        self.assoc = event.assoc
        no_delay(event.assoc)
        self.ready.set()

    def connection_closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE: mark the receiver gone, then wake any C-STORE waiting for its reply."""
        self.closed.set()
        event.assoc.dimse.msg_queue.put((None, None))

    def alive(self) -> bool:
        assoc = self.assoc
        return (assoc is not None and not self.closed.is_set() and assoc.is_established
                and not assoc.acse.is_aborted())


def handle_move(event: Event, context: NodeContext) -> Iterator[Any]:
    """EVT_C_MOVE handler: send the matches to a configured peer over a new association."""
    config = context.config  # read once: SIGHUP may swap it
    refused = operation_refusal(event, context, "move")
    if refused is not None:  # answered with this status instead of pynetdicom's A801 (move_destination)
        event.assoc.dcbnode_move_attempt = MoveRefused(int(event.request.MessageID), refused)
        yield None, None
        return
    raw = event.move_destination
    # Only spaces are insignificant in an AE title (PS3.5 6.2): a look-alike (other case, NUL or tab
    # padding) is not a configured peer.
    destination = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")).strip(" ")
    peer = config.peers.get(destination)
    if peer is None:
        event.assoc.dcbnode_move_attempt = None  # A801 as pynetdicom sends it
        context.log.warning("C-MOVE to unknown destination %r refused (A801)", destination)
        yield None, None
        return
    matches, failure = _matches(event, context)
    if failure is not None:  # answered without associating with the destination at all
        event.assoc.dcbnode_move_attempt = MoveRefused(int(event.request.MessageID), failure)
        yield None, None
        return
    # Read by move_destination.answer_unreachable when pynetdicom cannot establish the sub-association.
    attempt = event.assoc.dcbnode_move_attempt = DestinationAttempt(peer, int(event.request.MessageID))
    receiver = _Receiver()
    contexts = storage_contexts(matches) or [build_context(Verification)]
    yield peer.host, peer.port, {"ae_title": peer.ae_title, "contexts": contexts,
                                 "evt_handlers": [(evt.EVT_ACCEPTED, receiver.accepted),
                                                  (evt.EVT_CONN_CLOSE, receiver.connection_closed),
                                                  *attempt.handlers],
                                 "tls_args": client_tls_args(config.tls) if peer.tls else None}
    yield len(matches)
    if not matches:
        return
    # pynetdicom associated before resuming us; an unestablished association was already answered
    # (C801, see move_destination).
    receiver.ready.wait(_ACCEPT_WAIT)
    store_assoc = receiver.assoc
    accepted = accepted_storage_syntaxes(store_assoc.accepted_contexts) if store_assoc else {}
    context.log.info("C-MOVE of %d instance(s) to %s", len(matches), destination)
    yield from _sub_operations(event, context, matches, accepted, receiver.alive)
