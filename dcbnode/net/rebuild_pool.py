"""Rebuilding retrieved instances in helper processes, outside the association's thread and GIL.

Only with ``[retrieve] rebuild_helpers`` > 0 (default 0: a thread of the worker rebuilds, which costs
less CPU per instance; see docs/configuration.md).  A C-GET or C-MOVE rebuilds each instance (header
from the volume's dictionary, HTJ2K decoded for a native peer) while the previous one is sent.  In a
worker process that work shares one GIL with every association of that worker; here it runs in helper
processes of the worker (started with ``spawn`` on the first retrieve, each with its own archive
connection, at normal priority: a peer waits for their work).  A retrieve keeps one helper while it
runs (:class:`RebuildSession`); its lookahead (:func:`~.transfer.prepared_instances`) bounds the
requests outstanding, so at most ``lookahead + 1`` rebuilt instances are held for it.

Each helper talks to the worker over its own socket pair: a pickled request (a few hundred bytes), and
back the instance's fields and its bytes, which the association's thread reads straight into the buffer
that is then sent (no pickling of the data, no result thread: ``concurrent.futures``' process pool spent
≈ 0.5 ms of the worker's GIL per 512² CT instance on its result and feeder threads).

While no helper is idle (the first retrieve after the worker started, or after a helper died) an
instance is rebuilt in a thread of the worker, and a helper that dies (e.g. killed) fails no retrieve:
what it was asked for is rebuilt in the association's thread, and a new helper is started.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ..archive import Archive
from ..archive.retrieve import RetrieveMatch
from .wire import EncodedDataset

__all__ = ["RebuildPool", "RebuildSession"]

log = logging.getLogger("dcbnode.retrieve")

#: A message on a helper's socket: the length of its pickled fields, then of the bytes that follow them.
_PREFIX = struct.Struct("<IQ")
#: Send buffer of a helper's socket (the kernel caps it at net.core.wmem_max).
_SOCKET_BUFFER = 2 * 1024 * 1024
#: How often a helper checks that its worker is still there (seconds).
_PARENT_CHECK = 1.0
#: How long a starting helper may take to open the archive and say it is ready (seconds).
_START_TIMEOUT = 60.0
#: After a helper failed to start, no other is started for this long (seconds).
_RESTART_PAUSE = 5.0


def _send(sock: socket.socket, fields: Any, data: bytes | bytearray = b"") -> None:
    header = pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_PREFIX.pack(len(header), len(data)) + header)
    if data:
        sock.sendall(data)


def _read(sock: socket.socket, size: int) -> bytearray:
    """Exactly ``size`` bytes, read into one buffer; ``EOFError`` when the other end has gone.

    ``MSG_WAITALL``: one call (one release of the GIL) for a whole instance, not one per piece the kernel
    has; the loop only continues after a signal."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = sock.recv_into(view, 0, socket.MSG_WAITALL)
        if not received:
            raise EOFError("rebuild helper socket closed")
        view = view[received:]
    return buffer


def _receive(sock: socket.socket) -> tuple[Any, bytearray]:
    header_length, data_length = _PREFIX.unpack(_read(sock, _PREFIX.size))
    return pickle.loads(_read(sock, header_length)), _read(sock, data_length)


# -- in a helper process ------------------------------------------------------------------------------------


def _serve(sock: socket.socket, parent: int, data_dir: str, database_url: str, log_level: str, name: str) -> None:
    """A helper process: open the archive, say so, then rebuild what the worker asks for until it goes."""
    from .logging_setup import configure_logging
    from .transfer import prepare

    # Not PR_SET_PDEATHSIG: it fires when the *thread* that started the helper ends (a retrieve's thread).
    threading.Thread(target=_end_with, args=(parent,), name="dcbnode-parent-watch", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the node, which stops us
    configure_logging(log_level, name)
    archive = Archive(Path(data_dir), database_url, compresses=False)
    _send(sock, "ready")
    while True:
        try:
            (match, accepted, location, preference), _ = _receive(sock)
        except (EOFError, OSError):  # the worker closed the pool or ended
            return
        dataset = prepare(archive, match, accepted, location, preference)
        _send(sock, (dataset.SOPClassUID, dataset.SOPInstanceUID, str(dataset.file_meta.TransferSyntaxUID),
                     dataset.encoded is not None, dataset.reason), dataset.encoded or b"")


def _end_with(parent: int) -> None:
    """Exit once ``parent`` (the worker) is gone, even if it was killed."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK)
    os._exit(1)


# -- in the worker ------------------------------------------------------------------------------------------


class _Helper:
    """One helper process and the worker's end of its socket."""

    def __init__(self, process: BaseProcess, sock: socket.socket) -> None:
        self.process = process
        self.sock = sock

    def end(self) -> None:
        """Close the socket (the helper ends when it reads that) and reap the process."""
        self.sock.close()
        self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1.0)


class RebuildSession:
    """One retrieve's use of a helper: requests sent ahead, replies read in the same order.

    The helper works through the queued requests while the association sends the instance it has, so
    it never waits for the round trip of a reply.  The retrieve's lookahead bounds the requests
    outstanding, and so the rebuilt instances held (in the socket, until read).
    """

    def __init__(self, pool: RebuildPool, helper: _Helper) -> None:
        self._pool = pool
        self._helper: _Helper | None = helper
        self._outstanding = 0

    def request(self, match: RetrieveMatch, accepted: Mapping[str, frozenset[str]],
                location: tuple[str, int] | None, preference: Sequence[str]) -> bool:
        """Ask for ``match`` to be rebuilt; False if the helper is gone (the caller rebuilds it itself)."""
        if self._helper is None:
            return False
        try:
            _send(self._helper.sock, (match, dict(accepted), location, tuple(preference)))
        except OSError:
            self._lost(match)
            return False
        self._outstanding += 1
        return True

    def result(self, match: RetrieveMatch) -> EncodedDataset | None:
        """The reply to the oldest request (``match``'s); None if the helper died (the caller rebuilds it)."""
        if self._helper is None:
            return None
        try:
            (sop_class, sop_instance, syntax, has_data, reason), data = _receive(self._helper.sock)
        except (EOFError, OSError, pickle.UnpicklingError):
            self._lost(match)
            return None
        self._outstanding -= 1
        return EncodedDataset(sop_class, sop_instance, syntax, data if has_data else None, reason)

    def _lost(self, match: RetrieveMatch) -> None:
        log.warning("a rebuild helper process ended; rebuilding %s and what it had been asked for in the "
                    "association's thread", match.sop_instance_uid)
        helper, self._helper = self._helper, None
        if helper is not None:
            self._pool._drop(helper)

    def close(self) -> None:
        """Read the replies still due (a retrieve that ended early), then give the helper back."""
        helper = self._helper
        if helper is None:
            return
        try:
            for _ in range(self._outstanding):
                _receive(helper.sock)
        except (EOFError, OSError, pickle.UnpicklingError):
            self._helper = None
            self._pool._drop(helper)
            return
        self._helper = None
        self._pool._give_back(helper)


class RebuildPool:
    """``processes`` helper processes rebuilding instances for the retrieves of this process."""

    def __init__(self, data_dir: Path, database_url: str, *, processes: int, log_level: str, name: str) -> None:
        self._args = (os.getpid(), str(data_dir), database_url, log_level, name)
        self.processes = processes
        self._changed = threading.Condition()
        self._idle: list[_Helper] = []
        self._ready = 0  # helpers idle or rebuilding
        self._starting = 0
        self._start_failed = 0.0  # monotonic time of the last failed start
        self._closed = False

    def session(self) -> RebuildSession | None:
        """An idle helper for one retrieve, until :meth:`RebuildSession.close`; None while none is idle (the
        retrieve rebuilds in its own thread meanwhile, and asks again for its next instances)."""
        with self._changed:
            self._start_missing()
            if not self._idle:
                return None
            return RebuildSession(self, self._idle.pop())

    def _give_back(self, helper: _Helper) -> None:
        with self._changed:
            if not self._closed:
                self._idle.append(helper)
                self._changed.notify()
                return
            self._ready -= 1
        helper.end()

    def _drop(self, helper: _Helper) -> None:
        with self._changed:
            self._ready -= 1
            self._changed.notify_all()  # a waiting retrieve must not wait for a helper that is gone
            self._start_missing()
        helper.end()

    def _start_missing(self) -> None:
        """Start helpers up to ``processes`` (with the lock held; each starts in a thread of its own)."""
        if self._closed or time.monotonic() - self._start_failed < _RESTART_PAUSE:
            return
        while self._ready + self._starting < self.processes:
            self._starting += 1
            threading.Thread(target=self._start_one, name="dcbnode-rebuild-start", daemon=True).start()

    def _start_one(self) -> None:
        helper = None
        try:
            ours, theirs = socket.socketpair()
            for end in (ours, theirs):  # a rebuilt CT slice in one write, not in 200 KB steps (the default)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            try:
                process = multiprocessing.get_context("spawn").Process(
                    target=_serve, args=(theirs, *self._args), name="dcbnode-rebuild", daemon=True)
                process.start()
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            helper = _Helper(process, ours)
            helper.sock.settimeout(_START_TIMEOUT)
            ready, _ = _receive(helper.sock)
            helper.sock.settimeout(None)
            if ready != "ready":
                raise EOFError(f"unexpected first message {ready!r}")
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            if helper is not None:
                helper.end()
                exc = f"{exc}; exit code {helper.process.exitcode}"
            log.warning("a rebuild helper process did not start (%s); rebuilding in the associations' threads",
                        exc)
            with self._changed:
                self._starting -= 1
                self._start_failed = time.monotonic()
            return
        log.info("rebuild helper process %d ready", helper.process.pid)
        with self._changed:
            self._starting -= 1
            if not self._closed:
                self._ready += 1
                self._idle.append(helper)
                self._changed.notify()
                return
        helper.end()

    def close(self) -> None:
        """Stop the idle helpers; one still rebuilding stops when its rebuild is done."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._ready -= len(idle)
            self._changed.notify_all()
        for helper in idle:
            helper.end()
