"""The node's processes: the main process supervises association workers and one compressor.

* **Workers** (``[node] workers``, default one per CPU): each a forked copy of the main process serving
  associations from the listening socket they all inherit (:mod:`dcbnode.net.listener`), with its own
  archive connection, threads and GIL.  ``max_associations`` holds for all of them together
  (:mod:`dcbnode.net.slots`).
* **The compressor** (:mod:`dcbnode.archive.compressor`): deferred HTJ2K compression and compaction, at
  a lower CPU priority (``nice`` 10), so that it never takes a core from ingest or retrieve; it learns
  which volumes wait from the index.

The main process sends the systemd notifications, forwards SIGTERM and SIGHUP to every child, and
restarts a child that dies (after a second if it died within seconds of its start, so that one that
cannot start does not spin); a dead worker's associations are gone with it (its peers see the connection
drop), and nothing it acknowledged is lost: a Success is sent only after the fsync and the index commit.
Children die with the main process (``PR_SET_PDEATHSIG``).  Every process logs to the same stderr, its
lines tagged ``[main]``, ``[w1]``…, ``[compress]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config, ConfigError, load_config
from ..lifetime import die_with_parent
from ..net.slots import AssociationSlots

if TYPE_CHECKING:
    from ..net.listener import Listeners

log = logging.getLogger("dcbnode")

#: The signals every process of the node takes with sigwait (blocked in all of them).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
CHILD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}
#: A child that dies sooner than this after its start is restarted only after :data:`_RESTART_PAUSE`.
_QUICK_DEATH = 5.0
_RESTART_PAUSE = 1.0
#: Helper processes per worker that rebuild retrieved instances (dcbnode.net.rebuild_pool).
_REBUILD_HELPERS = 1
#: After the stop grace, how long the main process waits for its children before it kills them.
_STOP_MARGIN = 10.0


@dataclass
class _Child:
    name: str  #: "w1", "w2", … or "compress"
    start: Callable[[], int]  #: the child's body; its return value is the exit status
    pid: int = 0
    started: float = 0.0
    restart_at: float | None = None


class Supervisor:
    """Starts, restarts and stops the node's children (in the main process)."""

    def __init__(self, config: Config, overrides: dict[str, object], listening: Listeners,
                 slots: AssociationSlots) -> None:
        self.config = config
        self.overrides = overrides
        self.slots = slots
        workers = [_Child(f"w{number + 1}", _worker_body(number, config, overrides, listening, slots))
                   for number in range(slots.workers)]
        self._children = [*workers, _Child("compress", _compressor_body(config))]
        self._stopping = False

    def start(self) -> None:
        """Start every child."""
        for child in self._children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        child.restart_at = None
        child.started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the main process's code
            status = 1
            try:
                die_with_parent(os.getppid())
                from ..net.logging_setup import configure_logging

                configure_logging(self.config.node.log_level, child.name)
                status = child.start()
            except BaseException:
                logging.getLogger("dcbnode").exception("%s failed", child.name)
            finally:
                logging.shutdown()
                os._exit(status)
        child.pid = pid
        log.info("started %s (pid %d)", child.name, pid)

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
            child.pid = 0
            if child.name.startswith("w"):
                self.slots.reset(int(child.name[1:]) - 1)  # its associations are gone with it
            if self._stopping:
                log.info("%s (pid %d) ended: %s", child.name, pid, _describe(status))
                continue
            quick = time.monotonic() - child.started < _QUICK_DEATH
            child.restart_at = time.monotonic() + (_RESTART_PAUSE if quick else 0.0)
            log.error("%s (pid %d) died: %s; restarting it", child.name, pid, _describe(status))

    def restart_due(self) -> float | None:
        """Restart the children whose time has come; seconds until the next one is due (None: none)."""
        now = time.monotonic()
        waits = []
        for child in self._children:
            if child.restart_at is None or self._stopping:
                continue
            if child.restart_at <= now:
                self._spawn(child)
            else:
                waits.append(child.restart_at - now)
        return min(waits, default=None)

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
            if child.pid and child.name.startswith("w"):
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


def _worker_body(number: int, config: Config, overrides: dict[str, object], listening: Listeners,
                 slots: AssociationSlots) -> Callable[[], int]:
    def body() -> int:
        from ..archive import Archive
        from ..net.context import NodeContext
        from ..net.listener import AssociationLimit
        from ..net.rebuild_pool import RebuildPool
        from ..net.server import Node

        node_cfg = config.node
        archive = Archive(node_cfg.data_dir, node_cfg.resolved_database_url,
                          duplicate_policy=node_cfg.duplicate_policy, compresses=False,
                          index_busy_timeout=node_cfg.index_busy_timeout)
        rebuilds = RebuildPool(node_cfg.data_dir, node_cfg.resolved_database_url, processes=_REBUILD_HELPERS,
                               log_level=node_cfg.log_level, name=f"w{number + 1}-rebuild")
        node = Node(NodeContext(config=config, archive=archive, rebuilds=rebuilds), AssociationLimit(slots, number))
        try:
            node.start(listening)
            while signal.sigwait(CHILD_SIGNALS) == signal.SIGHUP:
                _reload_worker(node, overrides)
        finally:
            node.stop(grace=node_cfg.dimse_timeout)
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


def _compressor_body(config: Config) -> Callable[[], int]:
    def body() -> int:
        from ..archive import Archive
        from ..archive.compressor import NICENESS, Compressor

        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)
        node_cfg = config.node
        archive = Archive(node_cfg.data_dir, node_cfg.resolved_database_url,
                          duplicate_policy=node_cfg.duplicate_policy,
                          index_busy_timeout=node_cfg.index_busy_timeout)
        compressor = Compressor(archive, node_cfg.compression_delay, watch_index=True)
        compressor.start()
        try:
            signal.sigwait(STOP_SIGNALS)
        finally:
            if not compressor.stop():
                log.warning("deferred compression did not stop in time; its volume is left as it was")
            archive.close()
        return 0

    return body
