"""The DICOM node: a pynetdicom Application Entity serving the archive.

Presentation contexts: Verification; every storage SOP class pynetdicom knows × the transfer syntaxes a
DCBS volume can store (anything else is rejected at negotiation, so no C-STORE arrives that cannot be
archived); and, when their modules are present, Patient/Study Root C-FIND, C-MOVE and C-GET.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from ..config import Config
from ..dcbs.syntaxes import STORABLE_SYNTAXES
from .associations import ASSOCIATION_HANDLERS
from .context import NodeContext
from .echo_scp import handle_echo
from .store_scp import InFlight, handle_store

log = logging.getLogger("dcbnode.server")

#: Uncompressed syntaxes are enough for query/retrieve requests (identifiers only).
_QR_SYNTAXES = [str(uid) for uid in STORABLE_SYNTAXES[:4]]

#: (event, module, handler name, SOP classes the handler serves)
_QR_SERVICES = [
    (evt.EVT_C_FIND, "dcbnode.net.find_scp", "handle_find",
     [PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind]),
    (evt.EVT_C_MOVE, "dcbnode.net.retrieve_scp", "handle_move",
     [PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove]),
    (evt.EVT_C_GET, "dcbnode.net.retrieve_scp", "handle_get",
     [PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet]),
]


def _load_handler(module: str, name: str) -> Callable[..., Any] | None:
    """The Q/R handler if its module exists yet (they are developed separately)."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        log.exception("cannot load %s.%s; the service is not offered", module, name)
    except Exception:  # a broken Q/R module must not take storage down with it
        log.exception("cannot load %s.%s; the service is not offered", module, name)
    return None


def build_ae(config: Config) -> AE:
    """An AE configured from ``[node]`` and ``[access]``, with every supported context added."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    # 0 means "no limit" both in our config and in pynetdicom.
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.maximum_associations = node.max_associations
    apply_access(ae, config)
    syntaxes = [str(uid) for uid in STORABLE_SYNTAXES]
    ae.add_supported_context(Verification, syntaxes[:4])
    for context in AllStoragePresentationContexts:
        # scu_role/scp_role=True: accept a C-GET requestor's proposal to act as Storage SCP on the
        # association, so C-GET can send the instances back over it.
        ae.add_supported_context(context.abstract_syntax, syntaxes, scu_role=True, scp_role=True)
    return ae


def apply_access(ae: AE, config: Config) -> None:
    """Apply ``[access]`` to ``ae``; pynetdicom reads these per association request, so a SIGHUP
    reload takes effect for every new association."""
    ae.require_called_aet = config.access.require_called_aet
    # An empty list accepts any calling AE; pynetdicom rejects others with reason 3
    # "calling AE title not recognised".
    ae.require_calling_aet = list(config.access.allowed_calling_aets)


class Node:
    """The running node: server thread, handlers and graceful stop."""

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        self.in_flight = InFlight()
        self.ae = build_ae(context.config)
        self._server: ThreadedAssociationServer | None = None
        self._handlers = self._bind_handlers()

    def _bind_handlers(self) -> list[tuple[Any, ...]]:
        handlers: list[tuple[Any, ...]] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.context, self.in_flight]),
            *ASSOCIATION_HANDLERS,
        ]
        for event, module, name, sop_classes in _QR_SERVICES:
            handler = _load_handler(module, name)
            if handler is None:
                log.info("%s not available (no %s.%s yet); not offering it", event.name, module, name)
                continue
            for sop_class in sop_classes:
                self.ae.add_supported_context(sop_class, _QR_SYNTAXES)
            handlers.append((event, handler, [self.context]))
        return handlers

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and start accepting associations in a background thread."""
        node = self.context.config.node
        self._server = self.ae.start_server((node.bind, node.port), block=False, evt_handlers=self._handlers)

    def reload(self, fresh: Config) -> None:
        """Take ``[peers]`` and ``[access]`` from ``fresh`` for new associations."""
        self.context.reload(fresh)
        apply_access(self.ae, self.context.config)

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight C-STOREs finish (up to ``grace`` s), then end associations."""
        server = self._server
        if server is None:
            return
        # socketserver's shutdown ends the accept loop only; unlike AE.shutdown() it does not abort
        # the associations in progress.
        server.shutdown()
        active = server.active_associations
        if active:
            log.info("waiting for %d association(s) to finish their current operation", len(active))
        if not self.in_flight.wait_idle(grace):
            log.warning("C-STOREs still running after %.0f s; aborting their associations", grace)
        for assoc in server.active_associations:
            # Idle associations could stay open for network_timeout: end them now.
            assoc.abort()
        # A C-STORE that began in this window still runs to completion in its own thread (the peer
        # just never sees the response); it must end before the caller closes the archive.
        self.in_flight.wait_idle(grace)
        for assoc in active:
            # Connections that never sent an A-ASSOCIATE-RQ (port probes) linger until acse_timeout;
            # there is nothing to wait for in them.
            assoc.join(timeout=0.5)
        self._server = None
        log.info("stopped accepting associations")

