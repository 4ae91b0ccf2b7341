"""The node's processes: the main process supervises association workers and one compressor.

* **Workers** (``[node] workers``, default one per CPU): each a forked copy of the main process serving
  associations from the listening socket they all inherit (:mod:`dcbnode.net.listener`), with its own
  archive connection, threads and GIL.  ``max_associations`` holds for all of them together
  (:mod:`dcbnode.net.slots`).
* **The compressor** (:mod:`dcbnode.archive.compressor`): deferred HTJ2K compression and compaction, at
  a lower CPU priority (``nice`` 10), so that it never takes a core from ingest or retrieve; it learns
  which volumes wait from the index.

The main process sends the systemd notifications, forwards SIGTERM and SIGHUP to every child, and
restarts a child that dies; a dead worker's associations are gone with it (its peers see the connection
drop), and nothing it acknowledged is lost: a Success is sent only after the fsync and the index commit.
Children die with the main process (``PR_SET_PDEATHSIG``).  Every process logs to the same stderr, its
lines tagged ``[main]``, ``[w1]``…, ``[compress]``.

Restarts back off: a child that had been serving for :data:`_STABLE` seconds is restarted at once; one
that dies sooner (or before it was ready: its start failed, e.g. the index database is unreachable) waits
1 s, then 2, 4, 8, 16 and at most :data:`_MAX_PAUSE` seconds for each further failure in a row.  Each
restart is one log line.  When no worker serves and every one has failed :data:`_FAILING` times in a
row, the node says so once (an ERROR line and the systemd status), and again once a worker serves.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import service_notify
from ..config import Config, ConfigError, load_config
from ..lifetime import die_with_parent
from ..net.slots import AssociationSlots

if TYPE_CHECKING:
    from ..net.listener import Listeners

log = logging.getLogger("dcbnode")

#: The signals every process of the node takes with sigwait (blocked in all of them).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
CHILD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}
#: A child ready (serving) for this long is restarted at once if it dies, and its failures are forgotten.
_STABLE = 30.0
#: The pause before restarting a child after its first failure in a row; it doubles up to _MAX_PAUSE.
_FIRST_PAUSE, _MAX_PAUSE = 1.0, 30.0
#: Failures in a row of every worker, none serving, after which the node reports that it cannot serve.
_FAILING = 3
#: After the stop grace, how long the main process waits for its children before it kills them.
_STOP_MARGIN = 10.0


@dataclass
class _Child:
    name: str  #: "w1", "w2", … or "compress"
    #: the child's body, given a function to call once it serves; its return value is the exit status
    start: Callable[[Callable[[], None]], int]
    slot: int  #: its byte in the supervisor's table of ready flags
    pid: int = 0
    started: float = 0.0
    ready_since: float | None = None  #: when the main process first saw it ready (None: not yet)
    failures: int = 0  #: deaths in a row before it had served for _STABLE seconds
    restart_at: float | None = None

    @property
    def is_worker(self) -> bool:
        return self.name.startswith("w")


class Supervisor:
    """Starts, restarts and stops the node's children (in the main process)."""

    def __init__(self, config: Config, overrides: dict[str, object], listening: Listeners,
                 slots: AssociationSlots) -> None:
        self.config = config
        self.overrides = overrides
        self.slots = slots
        self._listening = listening
        workers = [_Child(f"w{number + 1}", _worker_body(number, config, overrides, listening, slots), number)
                   for number in range(slots.workers)]
        self._children = [*workers, _Child("compress", _compressor_body(config), len(workers))]
        #: one byte per child, shared over fork: the child sets it once it serves
        self._ready = mmap.mmap(-1, len(self._children))
        self._stopping = False
        self._down = False  #: the node said that no worker can serve

    def start(self) -> None:
        """Start every child."""
        for child in self._children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        child.restart_at = child.ready_since = None
        child.started = time.monotonic()
        self._ready[child.slot] = 0
        pid = os.fork()
        if pid == 0:  # the child: never returns into the main process's code
            status = 1
            try:
                die_with_parent(os.getppid())
                from ..net.logging_setup import configure_logging

                configure_logging(self.config.node.log_level, child.name)
                status = child.start(lambda: self._mark_ready(child))
            except BaseException as exc:
                _log_failure(child.name, exc)
            finally:
                logging.shutdown()
                os._exit(status)
        child.pid = pid
        log.info("started %s (pid %d)", child.name, pid)

    def _mark_ready(self, child: _Child) -> None:
        """In the child: it serves now."""
        self._ready[child.slot] = 1

    def reap(self) -> None:
        """Collect the children that ended; restart them unless the node is stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self._children if c.pid == pid), None)
            if child is None:
                continue
            self._note_ready(child, time.monotonic())  # it may have become ready since the last look
            child.pid = 0
            if child.is_worker:
                self.slots.reset(child.slot)  # its associations are gone with it
            if self._stopping:
                log.info("%s (pid %d) ended: %s", child.name, pid, _describe(status))
                continue
            self._schedule_restart(child, pid, status)
        self._report_serving()

    def _schedule_restart(self, child: _Child, pid: int, status: int) -> None:
        """Decide when a dead child starts again (see the module's docstring), and log it in one line."""
        now = time.monotonic()
        ready = child.ready_since is not None
        if child.ready_since is not None and now - child.ready_since >= _STABLE:
            child.failures = 0
            pause, when = 0.0, "now"
        else:
            child.failures += 1
            pause = min(_FIRST_PAUSE * 2 ** (child.failures - 1), _MAX_PAUSE)
            when = f"in {pause:.0f} s (failure {child.failures} in a row)"
        child.restart_at = now + pause
        log.error("%s (pid %d) died: %s, %.1f s after its start%s; restarting it %s", child.name, pid,
                  _describe(status), now - child.started, "" if ready else ", before it was ready", when)

    def restart_due(self) -> float | None:
        """Restart the children whose time has come, and notice those that now serve; seconds until the
        next restart is due (None: none)."""
        now = time.monotonic()
        waits = []
        for child in self._children:
            if child.pid:
                self._note_ready(child, now)
            if child.restart_at is None or self._stopping:
                continue
            if child.restart_at <= now:
                self._spawn(child)
            else:
                waits.append(child.restart_at - now)
        self._report_serving()
        return min(waits, default=None)

    def _note_ready(self, child: _Child, now: float) -> None:
        """Record when a child was first seen ready, and forget its failures once it has served
        for :data:`_STABLE` seconds."""
        if child.ready_since is None and self._ready[child.slot]:
            child.ready_since = now
            if child.failures:
                log.info("%s (pid %d) is ready again after %d failure(s) in a row", child.name, child.pid,
                         child.failures)
        if child.ready_since is not None and now - child.ready_since >= _STABLE:
            child.failures = 0

    def _report_serving(self) -> None:
        """Say once when no worker can serve (every one failing again and again), and once when one does
        again: in the log and in the systemd status."""
        if self._stopping:
            return
        workers = [child for child in self._children if child.is_worker]
        serving = any(child.pid and child.ready_since is not None for child in workers)
        if not self._down and not serving and all(child.failures >= _FAILING for child in workers):
            self._down = True
            log.error("no worker can serve: all %d worker(s) failed %d or more times in a row (their errors are "
                      "logged above, e.g. the index database is unreachable); associations wait unanswered "
                      "until one starts; retrying every %.0f s at most", len(workers), _FAILING, _MAX_PAUSE)
            service_notify.status("not serving: every worker fails at start (see the log); retrying")
        elif self._down and serving:
            self._down = False
            log.info("a worker serves again: accepting associations on %s", self._listening.describe())
            service_notify.status(f"accepting associations on {self._listening.describe()}")

    def reload(self) -> bool:
        """SIGHUP: check the configuration file, then have every worker take [peers] and [access] from it.

        Logged once here; an invalid file is reported and keeps the running configuration everywhere.
        """
        if self.config.source is None:
            log.warning("SIGHUP: no configuration file was given; nothing to reload")
            return False
        try:
            fresh = load_config(self.config.source, self.overrides)
        except ConfigError as error:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", error)
            return False
        for child in self._children:
            if child.pid and child.is_worker:
                _kill(child.pid, signal.SIGHUP)
        log.info("SIGHUP: reloaded [peers] (%d) and [access] (allowed calling AEs: %s)", len(fresh.peers),
                 ", ".join(fresh.access.allowed_calling_aets) or "any")
        return True

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every running child."""
        for child in self._children:
            if child.pid:
                _kill(child.pid, signum)

    def stop(self, grace: float) -> None:
        """SIGTERM every child and wait for them (workers finish their C-STOREs within ``grace``); those
        still running after ``grace`` + a margin are killed."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace + _STOP_MARGIN
        while any(child.pid for child in self._children):
            if time.monotonic() >= deadline:
                for child in self._children:
                    if child.pid:
                        log.warning("%s (pid %d) did not stop in time; killing it", child.name, child.pid)
                        _kill(child.pid, signal.SIGKILL)
                deadline = float("inf")
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
            self.reap()

    def pids(self) -> dict[str, int]:
        """The running children's pids by name."""
        return {child.name: child.pid for child in self._children if child.pid}


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended already; reap() collects it
        os.kill(pid, signum)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _log_failure(name: str, exc: BaseException) -> None:
    """A child's last words: one line for an index database it cannot reach, the traceback otherwise."""
    from sqlalchemy.exc import DBAPIError

    from ..index.database import reason

    if isinstance(exc, DBAPIError):
        log.error("%s cannot start: index database unavailable: %s", name, reason(exc))
    else:
        log.exception("%s failed", name)


def _worker_body(number: int, config: Config, overrides: dict[str, object], listening: Listeners,
                 slots: AssociationSlots) -> Callable[[Callable[[], None]], int]:
    def body(ready: Callable[[], None]) -> int:
        from ..archive import Archive
        from ..net.context import NodeContext
        from ..net.listener import AssociationLimit
        from ..net.rebuild_pool import RebuildPool
        from ..net.server import Node

        node_cfg = config.node
        archive = Archive(node_cfg.data_dir, node_cfg.resolved_database_url,
                          duplicate_policy=node_cfg.duplicate_policy, compresses=False,
                          index_busy_timeout=node_cfg.index_busy_timeout)
        helpers = config.retrieve.rebuild_helpers
        rebuilds = RebuildPool(node_cfg.data_dir, node_cfg.resolved_database_url, processes=helpers,
                               log_level=node_cfg.log_level, name=f"w{number + 1}-rebuild") if helpers else None
        node = Node(NodeContext(config=config, archive=archive, rebuilds=rebuilds), AssociationLimit(slots, number))
        try:
            node.start(listening)
            ready()
            while signal.sigwait(CHILD_SIGNALS) == signal.SIGHUP:
                _reload_worker(node, overrides)
        finally:
            node.stop(grace=node_cfg.dimse_timeout)
            if rebuilds is not None:
                rebuilds.close()
            archive.close()
        return 0

    return body


def _reload_worker(node: object, overrides: dict[str, object]) -> None:
    """A worker's part of SIGHUP (the main process checked the file and logs the outcome)."""
    from ..net.server import Node

    assert isinstance(node, Node)
    source = node.context.config.source
    try:
        node.reload(load_config(source, overrides))
    except ConfigError as error:  # changed again since the main process read it
        log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", error)


def _compressor_body(config: Config) -> Callable[[Callable[[], None]], int]:
    def body(ready: Callable[[], None]) -> int:
        from ..archive import Archive
        from ..archive.compressor import NICENESS, Compressor

        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)
        node_cfg = config.node
        archive = Archive(node_cfg.data_dir, node_cfg.resolved_database_url,
                          duplicate_policy=node_cfg.duplicate_policy,
                          index_busy_timeout=node_cfg.index_busy_timeout)
        compressor = Compressor(archive, node_cfg.compression_delay, watch_index=True)
        compressor.start()
        ready()
        try:
            signal.sigwait(STOP_SIGNALS)
        finally:
            if not compressor.stop():
                log.warning("deferred compression did not stop in time; its volume is left as it was")
            archive.close()
        return 0

    return body
