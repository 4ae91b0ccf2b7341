"""Verification SCU: C-ECHO a configured peer (``dcbnode-admin echo``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ..config import Config, PeerConfig
from .move_destination import DestinationAttempt
from .tls import client_tls_args


@dataclass(frozen=True)
class EchoResult:
    """The outcome of one C-ECHO."""

    peer: str
    host: str
    port: int
    ok: bool
    status: int | None
    seconds: float
    message: str


def echo(config: Config, peer: PeerConfig) -> EchoResult:
    """Associate with ``peer`` as our AE title, send one C-ECHO, release; never raises for network errors."""
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = config.node.acse_timeout
    ae.dimse_timeout = config.node.dimse_timeout
    ae.network_timeout = config.node.network_timeout
    ae.add_requested_context(Verification)
    started = time.monotonic()
    attempt = DestinationAttempt(peer, 0)  # why an association failed, as for a C-MOVE destination
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=attempt.handlers,
                         tls_args=client_tls_args(config.tls) if peer.tls else None)  # as a C-MOVE would
    if not assoc.is_established:
        return EchoResult(peer.ae_title, peer.host, peer.port, False, None, time.monotonic() - started,
                          attempt.reason())
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    ok = code == 0x0000
    message = "success" if ok else ("no response (DIMSE timeout)" if code is None else f"status 0x{code:04X}")
    return EchoResult(peer.ae_title, peer.host, peer.port, ok, code, time.monotonic() - started, message)
