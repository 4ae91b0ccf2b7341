"""dcbnode's own pynetdicom associations: subclasses, wired in through pynetdicom's extension points.

pynetdicom itself is never changed: a pynetdicom SCU in the same process (tests, ``dcbnode-admin
echo``) runs stock pynetdicom.  dcbnode's associations are made of:

* :class:`NodeAE` — the node's Application Entity.  Its servers are built by ``AE.make_server(...,
  server_class=..., request_handler=NodeRequestHandler)`` (:mod:`.listener`), and the C-MOVE
  sub-associations pynetdicom opens through ``AE.associate`` become :class:`NodeAssociation` too (in
  ``_create_socket``, the one step of ``associate`` that gets the new association before it is used).
* :class:`NodeAssociation` — sends an :class:`~.wire.EncodedDataset`'s bytes unchanged in
  ``send_c_store``; its reactor waits on its DIMSE queue instead of sleeping 1 ms between polls, so a
  received C-STORE reaches its handler at once.
* :class:`NodeDIMSE` — queues a whole DIMSE message as one primitive (:mod:`.wire`); its reactor poll
  takes nothing while a ``send_*()`` has paused the reactor to wait for its own reply; its queue hands
  the replies to the node's own requests to the threads that wait for them (:mod:`.replies`).
* :class:`NodeDUL` — sends such a message with one socket write; its idle wait ends as soon as the peer
  sends or a message is queued (pynetdicom's sleeps 1 ms).
* :class:`NodeSocket` — reads a PDU up to 256 KiB per system call (pynetdicom's: 4 KiB); every read and
  write has a deadline (:mod:`.guard`).

The network defences (:mod:`.guard`): a PDU header is checked before its body is read (garbage, a PDU
before the A-ASSOCIATE-RQ, or one claiming more than the node accepts → A-ABORT and the connection is
closed); a connection that has not sent its A-ASSOCIATE-RQ within ``association_request_timeout`` is
closed and, until it has, does not count against ``max_associations``.

Why each exists (measured on 512² CT): see :mod:`.wire` and the methods' docstrings.  The pynetdicom
internals they rely on are checked when this module is imported: an incompatible pynetdicom raises
``ImportError`` with one line saying what differs, and ``dcbnode serve`` stops at start.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from copy import copy
from datetime import datetime
from io import BytesIO
from typing import Any, cast

import pynetdicom
import pynetdicom.fsm
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dimse_messages import _DATASET_KEYWORDS, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationServer, AssociationSocket, RequestHandler

from .guard import HEADER, PDU_TYPES, header_refusal, io_deadline, remaining
from .move_destination import answer_unreachable
from .replies import ReplyRouter
from .wire import (
    EncodedBytesIO,
    EncodedDataset,
    EncodedMessage,
    command_elements,
    dimse_message,
    encode_command,
    encoded_pdus,
    pdata_pdus,
    store_response,
)

__all__ = ["NodeAE", "NodeAssociation", "NodeDIMSE", "NodeDUL", "NodeRequestHandler", "NodeSocket"]

log = logging.getLogger("dcbnode.wire")

#: The most one ``socket.recv`` call asks for (and so allocates ahead of the data actually received).
_RECV_CHUNK = 256 * 1024
#: pynetdicom's idle step (its DUL's ``_run_loop_delay``, its reactor's sleep); here the longest wait.
_IDLE = 0.001


class NodeSocket(AssociationSocket):
    """An association socket that reads large pieces, with a deadline for every read and write, and lets
    the DUL wait on it while idle."""

    #: Bytes :meth:`NodeDUL._read_pdu_data` read to check a PDU header, for the next :meth:`recv`.
    _unread = b""
    _handshaken = False

    def _handshake(self, connection: socket.socket, deadline: float | None) -> None:
        """An accepted TLS connection's handshake (:mod:`.tls`): here, in the association's thread, by the
        I/O deadline; ``OSError`` (``ssl.SSLError``) when it fails."""
        if self._handshaken or not isinstance(connection, ssl.SSLSocket) or not connection.server_side:
            return
        connection.settimeout(remaining(deadline))
        try:
            connection.do_handshake()
        except ssl.SSLError as exc:
            _note(self.assoc, f"TLS handshake failed ({exc.reason or exc})")
            raise
        self._handshaken = True

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what :meth:`recv` returns next."""
        self._unread = bytes(data) + self._unread

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's ``recv`` reading up to :data:`_RECV_CHUNK` per call (its own reads 4 KiB: 130 calls
        with their Python loop steps for one 512² CT slice).  Blocks until ``nr_bytes`` are read, and no
        longer than the association's I/O deadline (:func:`~.guard.io_deadline`); returns what there is
        when the peer closes, the connection fails or the deadline passes (pynetdicom then reports the
        connection closed, Evt17).  Never allocates more than the chunk ahead of the data (a PDU length is
        the peer's claim, up to 4 GiB)."""
        connection = cast(socket.socket, self.socket)
        bytestream = bytearray(self._unread[:nr_bytes])
        self._unread = self._unread[nr_bytes:]
        deadline = io_deadline(self.assoc, nr_bytes)
        try:
            self._handshake(connection, deadline)
            while len(bytestream) < nr_bytes:
                connection.settimeout(remaining(deadline, getattr(self.assoc, "network_timeout", None)))
                bytes_read = connection.recv(min(nr_bytes - len(bytestream), _RECV_CHUNK))
                if not bytes_read:
                    return bytestream
                bytestream += bytes_read
        except TimeoutError:
            _note(self.assoc, "sent no complete PDU in time (network_timeout, or association_request_timeout "
                              "before the A-ASSOCIATE-RQ)")
        except OSError:  # reset by the peer, closed by a stop: the connection is gone
            pass
        return bytestream

    def send(self, bytestream: bytes) -> None:
        """pynetdicom's ``send`` with the I/O deadline: a peer that stops reading (or reads a byte a
        second) is taken as a closed connection (Evt17) after ``network_timeout``, not waited for."""
        connection = cast(socket.socket, self.socket)
        deadline = io_deadline(self.assoc, len(bytestream))
        view = memoryview(bytestream)
        try:
            self._handshake(connection, deadline)
            while view:
                connection.settimeout(remaining(deadline, getattr(self.assoc, "network_timeout", None)))
                view = view[connection.send(view):]
        except TimeoutError:
            _note(self.assoc, "did not take what the node sent within network_timeout")
            self.event_queue.put("Evt17")
            return
        except (OSError, AttributeError):  # AttributeError: closed meanwhile (socket None)
            self.event_queue.put("Evt17")
            return
        evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})

    @property
    def ready(self) -> bool:
        """Whether data can be read; asked by the DUL loop each round, and first waits (see
        :meth:`NodeDUL.idle_wait`)."""
        if self._unread:
            return True
        dul = self.assoc.dul
        if isinstance(dul, NodeDUL) and self.socket is not None and self._is_connected:
            dul.idle_wait(self.socket)
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]


def _note(assoc: Association, problem: str) -> None:
    """Keep the first protocol problem of ``assoc``'s peer for the association's log line."""
    if not getattr(assoc, "refusal", ""):
        assoc.refusal = problem  # type: ignore[attr-defined]


class NodeStateMachine(StateMachine):
    """The DUL state machine; an acceptor whose connection ended before its A-ASSOCIATE-RQ ends at once."""

    def do_action(self, event: str) -> None:
        """pynetdicom's; back in Sta1 (no connection) without a request, the acceptor thread, which waits
        up to ``acse_timeout`` for the request, is woken (``None`` is what its wait returns on timeout)."""
        super().do_action(event)
        assoc = self.dul.assoc
        if self.current_state == "Sta1" and isinstance(assoc, NodeAssociation):
            assoc.abandon_request()


class NodeDUL(DULServiceProvider):
    """The upper layer of one association: one write per encoded DIMSE message, an idle wait that wakes.

    pynetdicom's loop sleeps ``_run_loop_delay`` (1 ms) when it had nothing to do, then looks at its
    queue and the socket: up to 1 ms before a queued message is sent and another before the peer's reply
    is read, for every C-STORE of a retrieve.  Here that sleep is 0 and the wait moves into the socket's
    ``ready`` check, where it ends at once when the peer sends or a primitive is queued (an eventfd).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.state_machine = NodeStateMachine(self)
        self._run_loop_delay = 0
        #: Set when a PDU was refused: the connection is closed once the A-ABORT is sent.
        self._refused = False
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self._wakeup)

    def idle_wait(self, connection: socket.socket) -> None:
        """Up to :data:`_IDLE` for the peer's data or a queued primitive, unless work is waiting already."""
        if not self.event_queue.empty() or not self.to_provider_queue.empty() or self._kill_thread:
            return
        try:
            readable, _, _ = select.select([connection, self._wakeup], [], [], _IDLE)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check reports it
            return
        if self._wakeup in readable:
            os.eventfd_read(self._wakeup)

    def _read_pdu_data(self) -> None:
        """pynetdicom's, after checking the PDU's header (:func:`~.guard.header_refusal`): a refused PDU is
        an invalid PDU (Evt19: A-ABORT) and its body is never read."""
        sock = cast(NodeSocket, self.socket)
        header = sock.recv(HEADER.size)
        assoc = self.assoc
        awaiting = getattr(assoc, "awaiting_request", False)
        if len(header) == HEADER.size:
            refusal = header_refusal(bytes(header), awaiting, assoc.ae.maximum_pdu_size)
            if refusal:
                _note(assoc, refusal)
                self._refused = True
                self.event_queue.put("Evt19")
                return
        sock.unread(header)
        super()._read_pdu_data()
        if self.event_queue.queue and self.event_queue.queue[-1] == "Evt19":  # pynetdicom could not decode it
            pdu_type = PDU_TYPES.get(header[0], "PDU") if header else "PDU"
            _note(assoc, f"sent {'an' if pdu_type[0] == 'A' else 'a'} {pdu_type} that cannot be decoded")
        if awaiting and header[:1] == b"\x01":
            cast(NodeAssociation, assoc).request_read()

    def _is_transport_event(self) -> bool:
        """pynetdicom's, except after a refused PDU: nothing more is read from the peer, and once the
        A-ABORT is sent (Sta13) the connection is closed."""
        if not self._refused:
            return bool(super()._is_transport_event())
        if self.state_machine.current_state == "Sta13" and self.socket is not None:
            self.socket.close()
            return True
        return False

    def send_pdu(self, primitive: Any) -> None:
        """Queue ``primitive`` for the peer and wake the DUL loop."""
        super().send_pdu(primitive)
        os.eventfd_write(self._wakeup, 1)

    def kill_dul(self) -> None:
        """Stop the DUL loop (at once, not after its idle wait)."""
        super().kill_dul()
        os.eventfd_write(self._wakeup, 1)

    def _send(self, pdu: Any) -> None:
        """Send a PDU; the P-DATA-TF of an :class:`~.wire.EncodedMessage` as its encoded bytes.

        Not fired for those: ``EVT_PDU_SENT`` (no handler of dcbnode's uses it; pynetdicom's own only log at
        DEBUG)."""
        encoded = encoded_pdus(pdu)
        if encoded is None:
            super()._send(pdu)
        elif self.socket is not None:
            self.socket.send(encoded)  # on failure it queues Evt17 (connection closed), as for any PDU
        else:
            log.warning("attempted to send a DIMSE message over a closed connection")


class NodeDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of one association: whole messages queued as one primitive."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.msg_queue = ReplyRouter()
        # Held while a message is handed to the DUL, EVT_DIMSE_SENT included: a message another thread
        # sends from an EVT_DIMSE_SENT handler (a Storage Commitment report after its N-ACTION response)
        # is queued after the one that triggered it, and the PDUs of two messages never interleave.
        self._sending = threading.RLock()

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Queue the whole message as one :class:`~.wire.EncodedMessage` (see :mod:`.wire`)."""
        with self._sending:
            self._send(primitive, context_id)

    def _send(self, primitive: Any, context_id: int) -> None:
        answer_unreachable(self.assoc, primitive)  # A801 for a configured C-MOVE destination -> C801
        if getattr(primitive, "_dataset_path", None) is not None:  # streamed from a file by pynetdicom
            super().send_msg(primitive, context_id)
            return
        if primitive.MessageIDBeingRespondedTo is None:
            message_class = _RQ_TO_MESSAGE[primitive.__class__]
        else:
            message_class = _RSP_TO_MESSAGE[primitive.__class__]
        keyword = _DATASET_KEYWORDS.get(message_class.__name__)
        dataset: BytesIO | None = getattr(primitive, keyword) if keyword else None
        elements = command_elements(primitive, message_class, dataset is not None)
        if elements is None:  # a value laid out only by pynetdicom (AT, non-ASCII text)
            message = message_class()
            message.primitive_to_message(primitive)
            message.context_id = context_id
            evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
            command = cast(bytes, encode(message.command_set, True, True))  # PS3.7 6.3.1: Implicit VR LE
        else:
            command = encode_command(elements)
            if self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
                message = dimse_message(message_class, context_id, elements, dataset)
                evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        if isinstance(dataset, EncodedBytesIO):
            data: bytes | bytearray = dataset.value
        else:
            data = dataset.getvalue() if dataset is not None else b""
        self.dul.send_pdu(EncodedMessage(context_id, pdata_pdus(context_id, command, data, self.maximum_pdu_size)))

    def receive_primitive(self, primitive: Any) -> None:
        """pynetdicom's, except that a C-STORE-RSP of the usual form is read by :func:`~.wire.store_response`
        (≈ 100 µs less of the association's GIL per sub-operation of a retrieve)."""
        decoded = store_response(primitive) if self.message is None else None
        if decoded is None:
            super().receive_primitive(primitive)
            return
        context_id, response, elements = decoded
        if self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            evt.trigger(self.assoc, evt.EVT_DIMSE_RECV,
                        {"message": dimse_message(C_STORE_RSP, context_id, elements, None)})
        self.msg_queue.put((context_id, response))

    def get_msg(self, block: bool = False) -> Any:
        """pynetdicom's ``get_msg``, except that the reactor's poll (``block=False``) takes nothing while a
        ``send_*()`` has paused the reactor to wait for its reply.

        ``send_c_store`` and the other ``send_*()`` clear ``_reactor_checkpoint`` and wait for
        ``_is_paused``; but the reactor sets ``_is_paused`` at the top of every loop, *before* it waits on
        the checkpoint, so a ``send_*()`` can see it still true from the previous loop while the reactor
        is about to poll: a fast reply would be taken by the reactor ("Received unexpected C-STORE service
        message") and the ``send_*()`` would wait out the DIMSE timeout (seen on C-MOVE sub-associations
        to DCMTK's storescp).
        """
        if not block and not self.assoc._reactor_checkpoint.is_set():
            return None, None
        return super().get_msg(block)


def copied_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """What ``deepcopy(contexts)`` gives, ≈ 50× faster: a context's one mutable member is its list of
    transfer syntaxes (its other values are ``None``, bools, ints and UIDs, which are immutable), whereas
    deepcopy rebuilt, and so re-validated, every UID: 25-30 ms of CPU for the node's 200-odd contexts,
    half of what a C-GET of nothing cost (checked by :func:`check_pynetdicom`)."""
    copies = []
    for context in contexts:
        duplicate = copy(context)
        duplicate._transfer_syntax = list(context._transfer_syntax)
        copies.append(duplicate)
    return copies


def await_message(assoc: Association, seconds: float) -> None:
    """Wait up to ``seconds`` for a DIMSE message on ``assoc``'s queue, for its reactor to take.

    Returns at once if one is already queued; sleeps ``seconds`` in full while a ``send_*()`` has paused
    the reactor (the paused reactor takes nothing, so returning early for the message left queued would
    spin).
    """
    messages = assoc.dimse.msg_queue
    if not assoc._reactor_checkpoint.is_set():
        time.sleep(seconds)
        return
    with messages.not_empty:  # the queue's mutex; put() notifies not_empty under it
        if messages._qsize():  # type: ignore[attr-defined]
            return
        messages.not_empty.wait(seconds)
        if messages._qsize():  # type: ignore[attr-defined]
            # put() notifies ONE waiter.  If a send_*() paused the reactor meanwhile and waits in
            # get_msg(block=True), the notification may have been meant for it: pass it on, or its get()
            # would wait out the DIMSE timeout.  A spare one is harmless: get() re-checks the queue.
            messages.not_empty.notify()


class NodeAssociation(Association):
    """One of dcbnode's associations (acceptor, or a C-MOVE sub-association it requests)."""

    #: An acceptor whose A-ASSOCIATE-RQ has not been read yet: not counted by
    #: :attr:`NodeAE.active_associations`, its reads end by :attr:`request_deadline`.
    awaiting_request = False
    request_deadline: float | None = None
    _abandoned = False
    #: The peer's first protocol problem (garbage, a PDU too long, a timeout), for the log line.
    refusal = ""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        super().__init__(ae, mode)
        self._use_node_providers()

    def _bind_defaults(self) -> None:
        """pynetdicom's default handlers, less its standard logging ones unless debugging
        (:func:`drop_standard_log_handlers`)."""
        super()._bind_defaults()
        drop_standard_log_handlers(self)

    def _use_node_providers(self) -> None:
        """Replace the DUL and DIMSE providers ``Association.__init__`` made (before any is used)."""
        self.dul = NodeDUL(self)
        self.dimse = NodeDIMSE(self)
        #: The presentation context each (SOP class, transfer syntax) of a sent EncodedDataset goes in.
        self._store_contexts: dict[tuple[str, str], PresentationContext] = {}
        # The setters put these on the DUL's timers.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def await_request(self, seconds: float) -> None:
        """As acceptor: the A-ASSOCIATE-RQ must be read within ``seconds`` from now, or the connection is
        closed (the ARTIM timer of PS3.8 9.1.5 while the DUL waits for data; the read deadline while it
        reads it)."""
        self.awaiting_request = True
        self.request_deadline = time.monotonic() + seconds
        self.dul.artim_timer.timeout = seconds

    def abandon_request(self) -> None:
        """As acceptor, once the connection has ended without an A-ASSOCIATE-RQ: wake the thread that waits
        for it (with ``None``, what its wait returns on timeout) so that it ends now, not after
        ``acse_timeout``."""
        if self.awaiting_request and not self._abandoned:
            self._abandoned = True
            self.dul.to_user_queue.put(None)  # type: ignore[arg-type]

    def request_read(self) -> None:
        """The A-ASSOCIATE-RQ has been read (the DUL thread, before the acceptor thread is given it): the
        contexts to negotiate are copied now, and ``acse_timeout`` is the ARTIM timeout again."""
        self.awaiting_request = False
        self.dul.artim_timer.timeout = self.acse_timeout
        if self._server is not None:
            # Done for each A-ASSOCIATE-RQ instead of each accepted connection, where pynetdicom's deepcopy
            # (~60 ms then) made the accepting thread the bottleneck of a port scan.
            self.acceptor.supported_contexts = copied_contexts(self._server.contexts)

    @classmethod
    def adopt(cls, assoc: Association) -> None:
        """Make a just-created pynetdicom ``Association`` (``AE.associate`` creates it itself) one of
        these, before it has a socket or has started."""
        assoc.__class__ = cls
        cast(NodeAssociation, assoc)._use_node_providers()
        drop_standard_log_handlers(assoc)

    def send_c_store(self, dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        """pynetdicom's ``send_c_store``; an :class:`~.wire.EncodedDataset` is sent as its bytes, unchanged.

        Its presentation context must accept its transfer syntax exactly (no conversion); a placeholder
        without bytes raises ``ValueError``, as pynetdicom does for a dataset it cannot encode (pynetdicom's
        retrieve service counts it as a failed sub-operation).
        """
        if not isinstance(dataset, EncodedDataset):
            return super().send_c_store(dataset, msg_id, priority, originator_aet, originator_id)
        if not self.is_established:
            raise RuntimeError("The association with the peer has been released or aborted")
        # pynetdicom walks and sorts the accepted contexts on every call (≈ 50 µs with getscu's 120); they do not
        # change once the association is established.
        key = (dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        context = self._store_contexts.get(key)
        if context is None:
            context = self._store_contexts[key] = self._get_valid_context(*key, "scu", allow_conversion=False)
        if dataset.encoded is None:
            raise ValueError(f"cannot send {dataset.SOPInstanceUID}: {dataset.reason}")
        request = C_STORE()
        request.MessageID = msg_id
        request.Priority = priority
        request.MoveOriginatorApplicationEntityTitle = originator_aet
        request.MoveOriginatorMessageID = originator_id
        request.AffectedSOPClassUID = dataset.SOPClassUID
        request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
        request.DataSet = EncodedBytesIO(dataset.encoded)
        # As pynetdicom: pause the reactor, so that the reply reaches this call, not the reactor.
        self._reactor_checkpoint.clear()
        while not self._is_paused:
            time.sleep(0.0001)
        try:
            self.dimse.send_msg(request, cast(int, context.context_id))
            _, response = self.dimse.get_msg(block=True)
        finally:
            self._reactor_checkpoint.set()
        if response is None:  # DIMSE timeout or connection closed
            self._handle_no_response()
            return Dataset()
        return cast(Dataset, self._check_received_status(response))

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's reactor loop, waiting on the DIMSE queue instead of sleeping 1 ms per round
        (:func:`await_message`): a decoded C-STORE request reaches its handler at once."""
        self._is_paused = False
        while not self._kill:
            await_message(self, _IDLE)
            # pynetdicom: paused (by a send_*()) until _reactor_checkpoint is set again.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self._reactor_should_end():
                return

    def _reactor_should_end(self) -> bool:
        """pynetdicom 3.0.4's end-of-round checks: release, abort, DUL gone, network timeout."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.error("network timeout reached on the association with %s", self.requestor.ae_title)
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


class NodeRequestHandler(RequestHandler):
    """The request handler of dcbnode's servers: each connection becomes a :class:`NodeAssociation`."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0.4's ``RequestHandler._create_association`` with dcbnode's association and socket."""
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(NodeSocket(assoc, client_socket=self.request))
        assoc.await_request(cast(NodeAE, self.ae).association_request_timeout)
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        # acceptor.supported_contexts: set once the A-ASSOCIATE-RQ is read (NodeAssociation.request_read).
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention:
                if handlers:
                    assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list, handlers):
                    assoc.bind(event, handler, args)
        return assoc


class NodeAE(ApplicationEntity):
    """The node's Application Entity: every association it requests is a :class:`NodeAssociation`."""

    #: Seconds a connection has to send its A-ASSOCIATE-RQ (``[node] association_request_timeout``).
    association_request_timeout = 5.0

    @property
    def active_associations(self) -> list[Association]:
        """pynetdicom's, without the connections that have not sent their A-ASSOCIATE-RQ yet: those are
        not associations, and must not take the places ``maximum_associations`` counts (a port scan
        would lock out every modality until their timeout)."""
        return [assoc for assoc in super().active_associations if not getattr(assoc, "awaiting_request", False)]

    def _create_socket(self, assoc: Association, address: AddressInformation, tls_args: Any) -> AssociationSocket:
        """Called by ``AE.associate`` with the association it just made, before anything uses it."""
        NodeAssociation.adopt(assoc)
        sock = NodeSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


#: pynetdicom's standard logging handlers: they format every PDU and DIMSE message, even when the
#: ``pynetdicom`` logger then drops the lines.
_STANDARD_LOG_HANDLERS = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                          (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
                          (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler))


def drop_standard_log_handlers(target: Association | AssociationServer) -> None:
    """Unbind pynetdicom's standard logging handlers from one of dcbnode's associations or servers, unless
    the ``pynetdicom`` logger takes DEBUG lines (see :mod:`.logging_setup`).

    What pynetdicom's ``_config.LOG_HANDLER_LEVEL = "none"`` does, for dcbnode's own associations only:
    that setting is process-wide, and would silence a stock pynetdicom SCU in the same process too.
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        return
    for event, handler in _STANDARD_LOG_HANDLERS:
        target.unbind(event, handler)


# -- what the subclasses rely on -----------------------------------------------------------------------------


def _names(function: Any) -> set[str]:
    return set(getattr(getattr(function, "__code__", None), "co_names", ()))


#: The members of a pynetdicom 3.0.4 PresentationContext (:func:`copied_contexts`).
_CONTEXT_FIELDS = {"_context_id", "_abstract_syntax", "_transfer_syntax", "result", "_scu_role", "_scp_role",
                   "_as_scp", "_as_scu"}


def check_pynetdicom() -> None:
    """Raise ``ImportError`` (one line) unless pynetdicom's internals are those the subclasses were written
    against (pynetdicom 3.0.4)."""
    problems = []
    if not {"time", "sleep", "_reactor_checkpoint", "_is_paused", "get_msg", "_serve_request",
            "is_release_requested", "idle_timer_expired"} <= _names(Association._run_reactor):
        problems.append("Association._run_reactor is not the loop NodeAssociation._run_reactor replaces")
    if not all(hasattr(Association, name) for name in ("_get_valid_context", "_check_received_status",
                                                       "_handle_no_response")):
        problems.append("Association lacks the helpers NodeAssociation.send_c_store uses")
    if not {"Association", "AssociationSocket", "_handlers", "supported_contexts"} <= _names(
            RequestHandler._create_association):
        problems.append("RequestHandler._create_association does not build the association the way "
                        "NodeRequestHandler does")
    if "_create_socket" not in _names(ApplicationEntity.associate):
        problems.append("AE.associate does not create its socket with AE._create_socket")
    for name in ("DT-1", "AR-7"):
        action = pynetdicom.fsm.ACTIONS.get(name, ("", None, ""))[1]
        if not {"to_provider_queue", "_send", "P_DATA_TF"} <= _names(action):
            problems.append(f"state machine action {name} does not send a queued P-DATA with dul._send")
    if not {"sleep", "_run_loop_delay", "_is_transport_event", "_process_recv_primitive"} <= _names(
            DULServiceProvider.run_reactor) or "ready" not in _names(DULServiceProvider._is_transport_event):
        problems.append("the DUL loop does not idle with time.sleep(_run_loop_delay) before socket.ready")
    if not {"encode_msg", "send_pdu", "primitive_to_message"} <= _names(DIMSEServiceProvider.send_msg):
        problems.append("DIMSEServiceProvider.send_msg does not queue encode_msg's P-DATA primitives")
    if not {"msg_queue", "put"} <= _names(DIMSEServiceProvider.receive_primitive):
        problems.append("DIMSEServiceProvider.receive_primitive does not put received messages in msg_queue")
    if not {"msg_queue", "get"} <= _names(DIMSEServiceProvider.get_msg) or not isinstance(
            DIMSEServiceProvider(None).msg_queue, queue.Queue):  # type: ignore[arg-type]
        problems.append("DIMSEServiceProvider.get_msg does not take from a queue.Queue")
    if not {"not_empty", "notify"} <= _names(queue.Queue.put):
        problems.append("queue.Queue.put does not notify not_empty")
    if not {"socket", "recv"} <= _names(AssociationSocket.recv):
        problems.append("AssociationSocket.recv does not read with socket.recv")
    if not {"LOG_HANDLER_LEVEL", "standard_pdu_sent_handler"} <= _names(Association._bind_defaults):
        problems.append("Association._bind_defaults does not bind the standard log handlers NodeAssociation drops")
    if set(vars(PresentationContext())) != _CONTEXT_FIELDS:
        problems.append("PresentationContext holds other members than copied_contexts copies")
    if not hasattr(os, "eventfd"):
        problems.append("os.eventfd is not available (Linux is required)")
    if problems:
        raise ImportError(f"pynetdicom {pynetdicom.__version__} is not supported by this dcbnode "
                          f"(written against 3.0.4): {'; '.join(problems)}")


check_pynetdicom()
