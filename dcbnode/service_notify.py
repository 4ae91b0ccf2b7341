"""The systemd service notification protocol (``sd_notify``), standard library only.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` pointing at an
``AF_UNIX`` datagram socket. The service reports its state by sending
newline-separated ``KEY=VALUE`` assignments to it, for example ``READY=1`` once
it really accepts connections. See ``sd_notify(3)`` for the full list of keys.

The protocol is small enough that depending on ``python-systemd`` (a C
extension that needs libsystemd headers to build) is not worth it. This module
implements the parts dcbnode needs:

* path sockets (``/run/systemd/notify``) and abstract sockets (``@name``);
* ``notify()`` returning ``False`` instead of raising when the process is not
  running under systemd, so the node runs unchanged in a terminal, in tests, or
  under another supervisor.

Typical use in the server::

    from dcbnode import service_notify

    service_notify.ready("listening on port 104")
    ...
    # on SIGHUP:
    service_notify.reloading()
    reload_peers_and_access()
    service_notify.ready()
    ...
    # on SIGTERM:
    service_notify.stopping()

Unsupported: ``vsock:`` addresses (systemd >= 254, for VMs); ``notify()`` logs
and returns ``False`` for them.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = [
    "NOTIFY_SOCKET_ENV",
    "extend_timeout",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
]

logger = logging.getLogger(__name__)

#: Environment variable systemd sets for ``Type=notify`` / ``notify-reload``
#: services (and for any service with ``NotifyAccess=`` configured).
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _socket_address(value: str) -> str | None:
    """Translate a ``$NOTIFY_SOCKET`` value into an ``AF_UNIX`` address.

    Returns ``None`` for values this module cannot use. A leading ``@`` marks
    a Linux abstract-namespace socket, whose kernel address starts with a NUL
    byte instead (the ``@`` notation is only how systemd spells it in text).
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def notify(state: str) -> bool:
    """Send *state* to the service manager.

    *state* is one or more ``KEY=VALUE`` assignments separated by newlines,
    exactly as in ``sd_notify(3)``, e.g. ``"READY=1\\nSTATUS=serving"``.

    Returns ``True`` if the datagram was sent. Returns ``False`` when the
    process is not running under systemd (``$NOTIFY_SOCKET`` unset or empty),
    when the address is of an unsupported kind, or when sending fails. Send
    failures are logged rather than raised: a lost status update must never
    take down a node that is otherwise serving associations.

    Raises ``ValueError`` for an empty *state*, which is a programming error.
    """
    if not state:
        raise ValueError("notify() needs at least one KEY=VALUE assignment")

    raw = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        logger.warning("unsupported %s address %r; not notifying systemd", NOTIFY_SOCKET_ENV, raw)
        return False

    try:
        # A fresh socket per message: notifications are rare (start, reload,
        # stop, occasional status), and this avoids any shared state between
        # threads or across fork(). SOCK_CLOEXEC keeps it out of children.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # No explicit SCM_CREDENTIALS needed: systemd enables SO_PASSCRED
            # on its end, so the kernel attaches our real pid, which is what
            # NotifyAccess=main checks against MAINPID.
            sent = sock.send(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("could not notify systemd via %r: %s", raw, exc)
        return False
    # A datagram is sent whole or not at all; a short count would mean a
    # truncated (and therefore misparsed) message.
    return sent == len(state.encode("utf-8"))


def _monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock systemd compares against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    """Make *text* safe as a single ``VALUE``: a newline would start a new assignment."""
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """Report that start-up (or a reload) has finished: ``READY=1``.

    Send it once the DICOM listener is bound and the index is open, so that
    ``systemctl start`` only returns when the node really accepts
    associations. Also send it after a reload to leave the reloading state.
    An optional *status_text* is sent in the same datagram as ``STATUS=``.
    """
    message = "READY=1"
    if status_text is not None:
        message += "\nSTATUS=" + _one_line(status_text)
    return notify(message)


def stopping() -> bool:
    """Report that a graceful shutdown has begun: ``STOPPING=1``."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Report that a configuration reload has begun.

    Sends ``RELOADING=1`` together with ``MONOTONIC_USEC=<now>``. systemd >= 253
    requires the timestamp for ``Type=notify-reload`` (it uses it to tell this
    reload apart from an earlier one); under plain ``Type=notify`` it is
    harmless. Call ``ready()`` when the reload is complete, otherwise systemd
    keeps the unit in the "reloading" state.
    """
    return notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")


def status(text: str) -> bool:
    """Set the free-form status line shown by ``systemctl status``: ``STATUS=<text>``.

    Newlines in *text* are replaced by spaces, since the protocol uses them
    to separate assignments.
    """
    return notify("STATUS=" + _one_line(text))


def extend_timeout(seconds: float) -> bool:
    """Ask for more time for the current start-up, reload or shutdown.

    Sends ``EXTEND_TIMEOUT_USEC=``: systemd then waits at least *seconds*
    from now before declaring the current operation timed out (e.g. while
    sealing a large volume on stop takes longer than ``TimeoutStopSec=``).
    Send it again before it expires to keep extending.
    """
    if seconds <= 0:
        raise ValueError("extend_timeout() needs a positive number of seconds")
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
