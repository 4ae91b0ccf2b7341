"""The node's listening socket, shared by its worker processes, and the server each worker runs on it.

**Pre-fork on an inherited socket.**  The main process binds the port (before recovery, so a taken port
is reported at once, while peers get "connection refused" until the node can answer), starts listening
once the archive is recovered, and then starts the workers, which inherit the socket.  Each worker's
:class:`NodeServer` accepts from it: the kernel queues every connection once, in one backlog, and gives
it to whichever worker calls ``accept`` first.  Every worker is woken for a new connection, and the
first to ask is not necessarily the least loaded (its association threads wait on the network or the
disk with the GIL released), so a worker that has more open connections than another one lets it go
first for a few milliseconds (:meth:`NodeServer.get_request`): associations spread over the workers,
hence over the cores.  The socket is non-blocking, so a worker that lost the race for a connection
returns to its wait instead of blocking in ``accept``.  A worker that dies loses only
the connections it had accepted; those still queued wait for the others.  (``SO_REUSEPORT`` — one
socket per worker — was not chosen: the kernel hashes connections onto the sockets whatever the
workers' load, drops those queued on a dead worker's socket, and a configured port 0 would give each
worker a different port.)

Every association counts against ``max_associations`` for the node as a whole (:mod:`.slots`): one
beyond it is rejected with A-ASSOCIATE-RJ rejected-transient, service-provider (presentation),
local-limit-exceeded, as pynetdicom rejects one beyond its own per-process limit.

**TLS** (``[tls]``, :mod:`.tls`) is a second listening socket (:class:`Listeners`), served the same way
by a second :class:`NodeServer` in each worker; ``[node] port = 0`` leaves only that one.  The server
wraps an accepted connection in TLS without the handshake, which the association's own thread does
(:class:`~.provider.NodeSocket`), so a client that connects and says nothing holds up nobody.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import time
from typing import Any, NamedTuple

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from .provider import drop_standard_log_handlers
from .slots import AssociationSlots

__all__ = ["AssociationLimit", "Listeners", "NodeServer", "open_listener", "start_listening"]

log = logging.getLogger("dcbnode.server")

#: Connections the kernel queues for the workers to accept.
_BACKLOG = 128
#: How long a busier worker lets a less busy one accept first: steps of so many seconds.
_YIELD_STEP = 0.001
_YIELD_STEPS = 5


def open_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)``, not yet listening (``OSError`` if the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As pynetdicom: a restarted node may bind while old connections are in TIME_WAIT.
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
    except BaseException:
        listening.close()
        raise
    return listening


def start_listening(listening: socket.socket) -> None:
    """Start queueing connections on ``listening`` for the workers (non-blocking accept, see above)."""
    listening.listen(_BACKLOG)
    listening.setblocking(False)


class Listeners(NamedTuple):
    """The node's listening sockets: plain DICOM (``node.port``) and DICOM over TLS (``tls.port``), each
    ``None`` when its port is 0."""

    plain: socket.socket | None
    tls: socket.socket | None

    @classmethod
    def open(cls, host: str, port: int, tls_port: int) -> Listeners:
        """Bind both (``OSError`` if a port is taken)."""
        plain = open_listener(host, port) if port else None
        try:
            return cls(plain, open_listener(host, tls_port) if tls_port else None)
        except BaseException:
            if plain is not None:
                plain.close()
            raise

    def sockets(self) -> list[socket.socket]:
        return [sock for sock in self if sock is not None]

    def start(self) -> None:
        """:func:`start_listening` on each."""
        for sock in self.sockets():
            start_listening(sock)

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()

    def describe(self) -> str:
        """``port 11112`` / ``port 11112, TLS port 2762`` / ``TLS port 2762``."""
        parts = [f"port {self.plain.getsockname()[1]}"] if self.plain is not None else []
        parts += [f"TLS port {self.tls.getsockname()[1]}"] if self.tls is not None else []
        return ", ".join(parts)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, accepting on a listening socket it was given (``listening``).

    Built by ``AE.make_server(..., server_class=NodeServer, listening=sock)``.  It never binds, listens or
    shuts the socket down — that would stop the port for every worker — it only closes its descriptor.
    """

    def __init__(self, *args: Any, listening: socket.socket, limit: AssociationLimit, **kwargs: Any) -> None:
        self._listening = listening
        self._limit = limit
        super().__init__(*args, **kwargs)

    def _bind_defaults(self) -> None:
        """pynetdicom's default handlers, less its standard logging ones unless debugging (they would be
        copied to every association; :func:`~.provider.drop_standard_log_handlers`)."""
        super()._bind_defaults()
        drop_standard_log_handlers(self)

    def server_bind(self) -> None:
        """Use the given socket instead of the one socketserver just made."""
        self.socket.close()
        self.socket = self._listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listening already (:func:`start_listening`)."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, after letting a less busy worker take the connection first (see the module's docstring);
        a TLS connection is wrapped without its handshake."""
        self._limit.yield_to_less_busy()
        client, address = self.socket.accept()  # BlockingIOError (an OSError) if another took it
        self._limit.slots.connection_opened(self._limit.worker)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def server_close(self) -> None:
        """Close this process's descriptor of the listening socket."""
        self.socket.close()

    def shutdown(self) -> None:
        """Stop accepting and close the descriptor (pynetdicom's ``shutdown`` also drops the server from the
        list ``AE.start_server`` keeps, which ``make_server`` never put it in)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class AssociationLimit:
    """``max_associations`` over every worker: the ``EVT_REQUESTED`` / ``EVT_CONN_CLOSE`` handlers that
    take and give back a slot of :class:`~.slots.AssociationSlots` for each association requested."""

    def __init__(self, slots: AssociationSlots, worker: int) -> None:
        self.slots = slots
        self.worker = worker

    def requested(self, event: Event) -> None:
        """An A-ASSOCIATE-RQ arrived: take a slot, or reject it as pynetdicom rejects one over its limit."""
        assoc = event.assoc
        if self.slots.acquire(self.worker):
            assoc.dcbnode_slot = True
            return
        # Who asked, for the association's log line (pynetdicom sets it only when it negotiates).
        assoc.requestor.ae_title = assoc.requestor.primitive.calling_ae_title
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, presentation, local-limit-exceeded
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def closed(self, event: Event) -> None:
        """The connection ended: give back its slot, if it had one."""
        self.slots.connection_closed(self.worker)
        if getattr(event.assoc, "dcbnode_slot", False):
            event.assoc.dcbnode_slot = False
            self.slots.release(self.worker)

    def yield_to_less_busy(self) -> None:
        """Wait (a few milliseconds at most) while another worker has fewer open connections, so that it
        can accept the waiting connection: a worker that is late (or dead) only delays it that long."""
        for _ in range(_YIELD_STEPS):
            if self.slots.least_busy(self.worker):
                return
            time.sleep(_YIELD_STEP)

    @property
    def handlers(self) -> list[tuple[Any, ...]]:
        """The handlers to bind on the server (before any other ``EVT_REQUESTED`` handler)."""
        return [(evt.EVT_REQUESTED, self.requested), (evt.EVT_CONN_CLOSE, self.closed)]
