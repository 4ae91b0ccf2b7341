"""Who may associate and what each peer may ask for: ``[access] require_known_peer`` and
``[peers.<AE>] allow``.

* With ``require_known_peer = true`` an A-ASSOCIATE-RQ is rejected (A-ASSOCIATE-RJ rejected-permanent,
  service-user, reason 3 "calling AE title not recognized") unless its calling AE title is a
  ``[peers]`` entry and the connection comes from an address that entry's ``host`` resolves to.
* A known peer asking for a service missing from its ``allow`` list gets the failure status
  :data:`NOT_AUTHORIZED` (0124H "Refused: Not Authorized", PS3.7 C.5) with an Error Comment; the
  association stays up (a modality allowed to store but not to query keeps storing).  A calling AE title
  that is not in ``[peers]`` may ask for everything unless ``require_known_peer`` is on.

Every refusal is logged with the AE title and the address.  The configuration is read per association
and per operation, so a SIGHUP reload applies to the next ones.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from ..config import Config
from .context import NodeContext

__all__ = ["NOT_AUTHORIZED", "PeerCheck", "handle_echo", "operation_refusal"]

log = logging.getLogger("dcbnode.access")

#: PS3.7 C.5: "Refused: Not Authorized".
NOT_AUTHORIZED = 0x0124
#: How long a peer's resolved addresses are reused (a DNS change is seen after this, a SIGHUP that
#: changes the host at once: the cache is keyed by host).
_RESOLVE_TTL = 60.0


def _normalised(address: str) -> str:
    """``address`` in one spelling: IPv4-mapped IPv6 (``::ffff:10.0.0.1``) as IPv4."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped or parsed)


class PeerCheck:
    """``evt.EVT_REQUESTED`` handler: rejects associations ``require_known_peer`` does not allow."""

    def __init__(self) -> None:
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def addresses(self, host: str) -> frozenset[str]:
        """The addresses ``host`` resolves to (empty when it does not resolve), cached briefly."""
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(host)
        if cached is not None and now - cached[0] < _RESOLVE_TTL:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            found = frozenset(_normalised(str(info[4][0])) for info in infos)
        except OSError as exc:
            log.warning("cannot resolve peer host %s: %s; connections claiming it are refused", host, exc)
            found = frozenset()
        with self._lock:
            self._resolved[host] = (now, found)
        return found

    def refusal(self, config: Config, calling: str, address: str) -> str:
        """Why ``require_known_peer`` refuses ``calling`` connecting from ``address``, or ``""``."""
        if not config.access.require_known_peer:
            return ""
        peer = config.peers.get(calling)
        if peer is None:
            return f"calling AE title {calling!r} is not in [peers]; [access] require_known_peer is on"
        if _normalised(address) not in self.addresses(peer.host):
            return f"{calling} connected from {address}, which is not its [peers.{calling}] host {peer.host}"
        return ""

    def __call__(self, event: Event, context: NodeContext) -> None:
        assoc = event.assoc
        if assoc.is_rejected:  # by the association limit, bound before
            return
        calling = str(assoc.requestor.primitive.calling_ae_title).strip(" ")
        why = self.refusal(context.config, calling, assoc.requestor.address)
        if not why:
            return
        # What pynetdicom's own negotiation would have set and done for a rejection (the association's
        # log line reads the reason from ``refusal``, see associations.rejection_reason).
        assoc.refusal = why
        assoc.requestor.ae_title = calling
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


def operation_refusal(event: Event, context: NodeContext, service: str) -> Dataset | None:
    """A :data:`NOT_AUTHORIZED` status (with an Error Comment) when the calling AE is a ``[peers]`` entry
    whose ``allow`` lacks ``service``; ``None`` when the operation may go ahead.  Logs the refusal."""
    assoc = event.assoc
    calling = assoc.requestor.ae_title.strip(" ")
    peer = context.config.peers.get(calling)
    if peer is None or service in peer.allow:
        return None
    comment = f"{calling} is not allowed to {service} here"
    log.warning("%s refused: %s@%s is not allowed to %s ([peers.%s] allow); answering 0x%04X",
                service, calling, assoc.requestor.address, service, calling, NOT_AUTHORIZED)
    refused = Dataset()
    refused.Status = NOT_AUTHORIZED
    refused.ErrorComment = comment[:64]
    return refused


def handle_echo(event: Event, context: NodeContext) -> Dataset | int:
    """``evt.EVT_C_ECHO`` handler: Success, or :data:`NOT_AUTHORIZED` for a peer not allowed to echo."""
    return operation_refusal(event, context, "echo") or 0x0000
