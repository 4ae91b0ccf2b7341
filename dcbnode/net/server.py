"""The DICOM node: a pynetdicom Application Entity serving the archive.

Presentation contexts: Verification; every storage SOP class (:mod:`.sop_classes`, private ones too unless
``[storage] accept_unknown_sop_classes = false``) × the transfer syntaxes a DCBS volume can store (anything
else is rejected at negotiation, so no C-STORE arrives that cannot be archived); and Patient/Study Root
C-FIND, C-MOVE and C-GET.  The associations are dcbnode's own (:mod:`.provider`); pynetdicom itself is left
as it is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from ..config import Config
from ..dcbs.syntaxes import STORABLE_SYNTAXES
from .access import PeerCheck, handle_echo
from .associations import ASSOCIATION_HANDLERS
from .commitment_scp import CommitmentService
from .context import NodeContext
from .find_scp import handle_find, negotiate_extended
from .listener import AssociationLimit, Listeners, NodeServer
from .provider import NodeAE, NodeRequestHandler
from .retrieve_scp import handle_get, handle_move
from .slots import AssociationSlots
from .sop_classes import UnknownStorageClasses, add_storage_contexts
from .store_scp import InFlight, handle_store
from .tls import server_context

log = logging.getLogger("dcbnode.server")

#: Uncompressed syntaxes are enough for query/retrieve requests (identifiers only).
_QR_SYNTAXES = [str(uid) for uid in STORABLE_SYNTAXES[:4]]

#: (event, handler, SOP classes the handler serves)
_QR_SERVICES = [
    (evt.EVT_C_FIND, handle_find,
     [PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind]),
    (evt.EVT_C_MOVE, handle_move,
     [PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove]),
    (evt.EVT_C_GET, handle_get,
     [PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet]),
]


def build_ae(config: Config) -> NodeAE:
    """An AE configured from ``[node]`` and ``[access]``, with every supported context added."""
    node = config.node
    ae = NodeAE(ae_title=node.ae_title)
    # 0 means "no limit" both in our config and in pynetdicom.
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout
    ae.association_request_timeout = node.association_request_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.maximum_associations = node.max_associations
    apply_access(ae, config)
    syntaxes = [str(uid) for uid in STORABLE_SYNTAXES]
    ae.add_supported_context(Verification, syntaxes[:4])
    ae.add_supported_context(StorageCommitmentPushModel, syntaxes[:4])
    add_storage_contexts(ae, syntaxes)
    return ae


def apply_access(ae: NodeAE, config: Config) -> None:
    """Apply ``[access]`` to ``ae``; pynetdicom reads these per association request, so a SIGHUP
    reload takes effect for every new association."""
    ae.require_called_aet = config.access.require_called_aet
    # An empty list accepts any calling AE; pynetdicom rejects others with reason 3
    # "calling AE title not recognised".
    ae.require_calling_aet = list(config.access.allowed_calling_aets)


class Node:
    """The running node: server thread, handlers and graceful stop."""

    def __init__(self, context: NodeContext, limit: AssociationLimit | None = None) -> None:
        """``limit``: the node's association slots when several workers share them (default: this
        process's own, ``node.max_associations``)."""
        self.context = context
        self.in_flight = InFlight()
        self.ae = build_ae(context.config)
        self.commitments = CommitmentService(context)
        self.limit = limit or AssociationLimit(AssociationSlots(context.config.node.max_associations, 1), 0)
        self._servers: list[NodeServer] = []
        self._handlers = self._bind_handlers()

    def _bind_handlers(self) -> list[tuple[Any, ...]]:
        handlers: list[tuple[Any, ...]] = [
            *self.limit.handlers,  # first: a rejected association gets no further EVT_REQUESTED work
            (evt.EVT_REQUESTED, PeerCheck(), [self.context]),  # [access] require_known_peer
            (evt.EVT_C_ECHO, handle_echo, [self.context]),
            (evt.EVT_C_STORE, handle_store, [self.context, self.in_flight]),
            (evt.EVT_SOP_EXTENDED, negotiate_extended),  # combined date-time matching for C-FIND
            (evt.EVT_N_ACTION, self.commitments.handle_n_action),
            *ASSOCIATION_HANDLERS,
        ]
        if self.context.config.storage.accept_unknown_sop_classes:
            handlers.append((evt.EVT_REQUESTED, UnknownStorageClasses([str(uid) for uid in STORABLE_SYNTAXES])))
        for event, handler, sop_classes in _QR_SERVICES:
            for sop_class in sop_classes:
                self.ae.add_supported_context(sop_class, _QR_SYNTAXES)
            handlers.append((event, handler, [self.context]))
        return handlers

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        assert self._servers
        return int(self._servers[0].server_address[1])

    def start(self, listening: Listeners) -> None:
        """Start accepting associations from ``listening`` (:meth:`~.listener.Listeners.start`) in a
        background thread, and delivering storage commitment reports."""
        tls = server_context(self.context.config.tls) if listening.tls is not None else None
        for sock, ssl_context in ((listening.plain, None), (listening.tls, tls)):
            if sock is None:
                continue
            server = self.ae.make_server(sock.getsockname()[:2], evt_handlers=self._handlers, server_class=NodeServer,
                                         request_handler=NodeRequestHandler, listening=sock, limit=self.limit,
                                         ssl_context=ssl_context)
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, name="dcbnode-acceptor", daemon=True).start()
        self.commitments.start()

    def reload(self, fresh: Config) -> None:
        """Take ``[peers]`` and ``[access]`` from ``fresh`` for new associations."""
        self.context.reload(fresh)
        apply_access(self.ae, self.context.config)

    def stop(self, grace: float) -> None:
        """Stop accepting, let the C-STOREs being processed finish (up to ``grace`` s), end every
        connection, and return once no pynetdicom thread is left that could hold the process open.

        Bounded: about ``grace`` + :data:`_CLOSE_TIMEOUT` seconds at worst, well under a second when idle.
        """
        servers, self._servers = self._servers, []
        if not servers:
            return
        # C-STOREs arriving from now on are refused with 0xA700 (the sender may retry), so the wait
        # below cannot be prolonged by new work.
        self.in_flight.close()
        # NodeServer.shutdown(): ends the accept loop and closes this process's listening descriptor.
        # Unlike AE.shutdown() it does not abort the associations in progress.
        for server in servers:
            server.shutdown()
        if not self.commitments.stop(_CLOSE_TIMEOUT):
            log.warning("a storage commitment report was still being sent; it is sent again after the restart")
        busy = self.in_flight.count
        if busy:
            log.info("waiting up to %.0f s for %d C-STORE(s) in progress", grace, busy)
            if not self.in_flight.wait_idle(grace):
                log.warning("C-STOREs still running after %.0f s; aborting their associations", grace)
        associations = [assoc for server in servers for assoc in server.active_associations]
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        for assoc in associations:
            _end_connection(assoc)
        for assoc in associations:
            _stop_dul(assoc, deadline)
        for assoc in associations:
            # The AcceptorThread notices its DUL thread ended and returns (or is still in a handler
            # past the grace; it is a daemon thread, nothing waits for it at exit). One accepted just as
            # the stop began may not have started its thread yet: nothing to wait for.
            if assoc.ident is not None:
                assoc.join(max(0.0, deadline - time.monotonic()))
        # A handler that overran the grace may still be writing: give it the rest of the close time
        # before the caller closes the archive.
        self.in_flight.wait_idle(max(0.0, deadline - time.monotonic()))
        log.info("stopped accepting associations (%d connection(s) ended)", len(associations))


#: After the grace, how long the peers get to close their end after our A-ABORT, and the handlers to end.
_CLOSE_TIMEOUT = 2.0

# pynetdicom 3.0's Association.abort() blocks in Association.kill() until the DUL state machine is
# back in Sta1 (idle), with no time limit, and raises InvalidEventError in the DUL thread for a
# connection that never sent an A-ASSOCIATE-RQ (A-ABORT request in Sta2 is not a valid event). Its DUL
# threads are non-daemon, so one left running keeps the interpreter from exiting. The helpers below
# end each connection by the state table instead, then stop the DUL threads with a deadline.


def _end_connection(assoc: Association) -> None:
    """Start ending ``assoc``'s connection without blocking: A-ABORT an association, close a bare
    connection (PS3.8 9.2: in Sta2 there is no association to abort)."""
    dul = assoc.dul
    state = dul.state_machine.current_state
    if state == "Sta2":
        # Transport open, awaiting A-ASSOCIATE-RQ (e.g. a port probe): act as if the ARTIM timer
        # expired (Sta2 + Evt18 -> AA-2), which closes the connection, reports EVT_CONN_CLOSE and
        # stops the DUL thread.
        dul.event_queue.put("Evt18")
    elif state != "Sta1" and not (assoc.is_aborted or assoc.is_released or assoc.is_rejected):
        # A-ABORT (AA-1) and Sta13 until the peer closes its end or ARTIM expires.
        assoc.abort(block=False)
    if state in ("Sta1", "Sta2"):
        # The AcceptorThread waits up to acse_timeout for the A-ASSOCIATE-RQ: wake it (None is what a
        # timeout returns; it then stops the association itself).
        dul.to_user_queue.put(None)  # type: ignore[arg-type]


def _stop_dul(assoc: Association, deadline: float) -> None:
    """Wait (until ``deadline``) for ``assoc``'s DUL to return to Sta1, then stop its thread."""
    dul = assoc.dul
    while dul.is_alive() and dul.state_machine.current_state != "Sta1" and time.monotonic() < deadline:
        time.sleep(0.01)
    if dul.is_alive() and dul.state_machine.current_state != "Sta1":
        log.warning("connection from %s:%s did not close in time; dropping it",
                    *assoc.requestor.address_info.as_tuple[:2])
        with contextlib.suppress(Exception):
            dul.socket.close()  # type: ignore[union-attr]
    # The DUL loop checks this flag every millisecond; a DUL thread the AcceptorThread has not started
    # yet exits on its first iteration.
    dul.kill_dul()
    if dul.ident is not None:
        dul.join(max(0.1, deadline - time.monotonic()))
