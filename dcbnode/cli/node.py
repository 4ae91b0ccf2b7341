"""``dcbnode serve``: run the DICOM node in the foreground, logging to stderr.

Exit status: 0 after a SIGTERM/SIGINT stop; 2 for an invalid configuration or an unusable data folder
(not a directory, not writable, in use by another node), reported on one line before anything is bound;
1 for any other start-up failure (e.g. the port is taken), also on one line.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import service_notify, version_line
from ..config import LOG_LEVELS, Config, ConfigError, load_config
from .processes import STOP_SIGNALS

if TYPE_CHECKING:
    from ..archive import Archive
    from ..net.listener import Listeners

log = logging.getLogger("dcbnode")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    # Raw: the version line must not be wrapped.
    parser = argparse.ArgumentParser(prog="dcbnode", description="DICOM node archiving into DCBS volumes",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line("dcbnode"))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the node in the foreground (logs to stderr)")
    serve.add_argument("--config", type=Path, help="TOML configuration file (default: built-in defaults)")
    serve.add_argument("--ae-title", help="our AE title (node.ae_title)")
    serve.add_argument("--port", type=int, help="TCP port (node.port)")
    serve.add_argument("--bind", help="address to listen on (node.bind)")
    serve.add_argument("--data-dir", help="volumes and SQLite index directory (node.data_dir)")
    serve.add_argument("--database-url", help="SQLAlchemy URL of the index (node.database_url)")
    serve.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="node.log_level")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "node.ae_title": args.ae_title,
        "node.port": args.port,
        "node.bind": args.bind,
        "node.data_dir": args.data_dir,
        "node.database_url": args.database_url,
        "node.log_level": args.log_level,
    }


#: Signals the main thread takes with sigwait(): SIGHUP reloads, SIGCHLD says a child process ended, the
#: others stop the node.
_STOP_SIGNALS = STOP_SIGNALS
_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP, signal.SIGCHLD}


class _Signals:
    """SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken synchronously by the main thread.

    A Python signal handler only runs when the main thread executes bytecode. The kernel delivers a
    process-directed signal to *any* thread that does not block it, so a main thread sleeping in an
    untimed ``Event.wait()`` could miss a SIGTERM taken by a pynetdicom thread for good; and a handler
    that calls ``Event.set()`` deadlocks when it interrupts the main thread inside that Event's own
    lock. Blocking the signals before any thread starts (threads inherit the mask) and collecting them
    with ``sigwait`` avoids both: no handler runs asynchronously, and a signal sent at any time (during
    recovery too) stays pending until the main thread asks for it.
    """

    def __init__(self) -> None:
        self._previous: set[signal.Signals] | None = None

    def block(self) -> None:
        """Block the signals in this thread and in every thread it starts from now on."""
        self._previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        # SIGUSR1 dumps every thread's stack to stderr, so a stop that hangs can be diagnosed in place.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def unblock(self) -> None:
        """Restore the mask (only matters when ``serve`` runs in-process, e.g. under a debugger)."""
        if self._previous is not None:
            faulthandler.unregister(signal.SIGUSR1)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous)
            self._previous = None

    @staticmethod
    def stop_pending() -> bool:
        """A stop signal arrived and was not collected yet."""
        return bool(signal.sigpending() & _STOP_SIGNALS)

    @staticmethod
    def wait(timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for one of the signals; its number, or None."""
        info = signal.sigtimedwait(_SIGNALS, timeout)
        return info.si_signo if info is not None else None


def serve(args: argparse.Namespace) -> int:
    """Load the configuration, recover the archive, serve until SIGTERM/SIGINT."""
    signals = _Signals()
    # First of all, before any thread exists: threads inherit the signal mask, and importing the
    # network code (pydicom → numpy) already starts OpenBLAS's thread, in which an unblocked SIGTERM
    # would kill the process (exit -15) instead of stopping it cleanly, at any time, even mid-recovery.
    signals.block()
    try:
        overrides = _overrides(args)
        try:
            config = load_config(args.config, overrides)
        except ConfigError as error:
            print(f"dcbnode: {error}", file=sys.stderr)
            return EXIT_CONFIG
        from ..net.logging_setup import configure_logging

        configure_logging(config.node.log_level)
        return _serve(config, overrides, signals)
    finally:
        signals.unblock()


def _serve(config: Config, overrides: dict[str, object], signals: _Signals) -> int:
    """Take the data folder, reserve the port, recover, then serve; every start-up problem is one line."""
    # Heavy imports after the config check, so a bad config fails fast.
    from sqlalchemy.exc import DBAPIError

    from ..archive import Archive
    from ..archive.node_lock import DataDirError, NodeLock, prepare_data_dir
    from ..index.database import reason
    from ..index.schema import SchemaError

    try:
        from ..net import server  # noqa: F401 - the workers' code, imported (and checked) before they start
    except ImportError as exc:  # e.g. a pynetdicom whose internals dcbnode's associations do not fit
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    from ..net.listener import Listeners

    node_cfg = config.node
    log.info("starting %s on %s:%d, data %s, index %s", node_cfg.ae_title, node_cfg.bind, node_cfg.port,
             node_cfg.data_dir, node_cfg.redacted_database_url)
    try:
        prepare_data_dir(node_cfg.data_dir)
        # Held until the process ends: a second node on this folder is refused (SQLite: any other node).
        lock = NodeLock(node_cfg.data_dir, exclusive=node_cfg.resolved_database_url.startswith("sqlite"))
    except DataDirError as error:
        log.error("%s", error)
        return EXIT_CONFIG
    try:
        try:
            archive = Archive(node_cfg.data_dir, node_cfg.resolved_database_url,
                              duplicate_policy=node_cfg.duplicate_policy,
                              index_busy_timeout=node_cfg.index_busy_timeout)
        except OSError as exc:
            log.error("cannot use data folder %s: %s; set node.data_dir to a writable folder on a local disk",
                      node_cfg.data_dir, exc.strerror or exc)
            return EXIT_CONFIG
        except SchemaError as error:
            log.error("%s", error)
            return EXIT_CONFIG
        except DBAPIError as exc:  # e.g. PostgreSQL not (yet) up: exit 1, systemd starts the node again
            log.error("cannot open the index %s: %s", node_cfg.redacted_database_url, reason(exc))
            return EXIT_FAILURE
        try:
            # Before recovery, which can take minutes: a taken port is reported now.
            listening = Listeners.open(node_cfg.bind, node_cfg.port, config.tls.port)
        except OSError as exc:
            archive.close()
            log.error("cannot listen on %s port %d%s: %s", node_cfg.bind, node_cfg.port,
                      f" or TLS port {config.tls.port}" if config.tls.port else "", exc.strerror or exc)
            return EXIT_FAILURE
        try:
            if not _recover(archive, signals):
                return EXIT_OK
            return _supervise(config, overrides, listening, signals)
        finally:
            listening.close()
    finally:
        lock.release()


class _RecoveryProgress:
    """Keeps systemd waiting while recovery runs, and says how far it got.

    The unit's start timeout (``TimeoutStartSec=``, 90 s by default) runs until READY=1, which comes after
    recovery.  On a large archive, or after a crash that left many volumes to re-read, recovery can take
    longer: systemd would kill the node and restart it, into the same recovery, forever.  So the node asks
    for :data:`_EXTEND` more seconds at the start and then every :data:`_EVERY` seconds while volumes
    are checked (``EXTEND_TIMEOUT_USEC``), with a status line (``systemctl status``) and, every
    :data:`_LOG_EVERY` seconds, a log line.  A recovery that hangs stops asking: systemd still ends it.
    """

    def __init__(self) -> None:
        self.started = self._notified = self._logged = time.monotonic()
        service_notify.extend_timeout(_EXTEND)
        service_notify.status("recovering the archive: listing volumes")

    def __call__(self, number: int, total: int) -> None:
        now = time.monotonic()
        if now - self._notified >= _EVERY:
            self._notified = now
            service_notify.extend_timeout(_EXTEND)
            service_notify.status(f"recovering the archive: {number} of {total} volumes checked")
        if now - self._logged >= _LOG_EVERY:
            self._logged = now
            log.info("recovery: %d of %d volume(s) checked after %.0f s", number, total, now - self.started)

    def elapsed(self) -> float:
        """Seconds since recovery started."""
        return time.monotonic() - self.started


#: Recovery asks systemd for this many more seconds each time (longer than its slowest step between two
#: volumes: listing and reading every volume's header before the first one), every _EVERY seconds.
_EXTEND, _EVERY, _LOG_EVERY = 300.0, 10.0, 30.0


def _recover(archive: Archive, signals: _Signals) -> bool:
    """Recover the archive (then close it: the workers open their own); False if a stop came meanwhile."""
    from ..archive.recovery import recover

    try:
        progress = _RecoveryProgress()
        report = recover(archive, progress)
        log.info("recovery: %d volume(s), %d torn byte(s) cut, %d instance(s) indexed, %d removed, "
                 "%d byte(s) of unacknowledged duplicates cut, in %.1f s", report.volumes, report.torn_bytes_cut,
                 report.instances_indexed, report.instances_removed, report.duplicates_cut, progress.elapsed())
        for problem in report.problems:
            log.error("recovery problem: %s", problem)
        if archive.pending:
            log.info("%d series volume(s) wait for deferred compression", len(archive.pending))
    finally:
        archive.close()
    if signals.stop_pending():
        log.info("stop requested during recovery; not accepting associations")
        return False
    return True


def _supervise(config: Config, overrides: dict[str, object], listening: Listeners, signals: _Signals) -> int:
    """Listen, start the workers and the compressor, and supervise them until SIGTERM/SIGINT."""
    from ..net.slots import AssociationSlots
    from .processes import Supervisor

    node_cfg = config.node
    listening.start()
    slots = AssociationSlots(node_cfg.max_associations, node_cfg.worker_count)
    supervisor = Supervisor(config, overrides, listening, slots)
    try:
        supervisor.start()
        log.info("%s accepting associations on %s %s (%d worker process(es), at most %d association(s) at once)",
                 node_cfg.ae_title, node_cfg.bind, listening.describe(), slots.workers, slots.limit)
        service_notify.ready(f"accepting associations on {listening.describe()}")
        while True:
            signum = signals.wait(min(supervisor.restart_due() or _POLL, _POLL))
            if signum in _STOP_SIGNALS:
                break
            if signum == signal.SIGHUP:
                service_notify.reloading()
                supervisor.reload()
                service_notify.ready()
            supervisor.reap()  # SIGCHLD, or the periodic look
        log.info("stop requested; finishing in-flight operations")
        service_notify.stopping()
    finally:
        supervisor.stop(grace=node_cfg.dimse_timeout)
        log.info("stopped")
    return EXIT_OK


#: How often the main process looks at its children even without a SIGCHLD.
_POLL = 1.0


def main(argv: list[str] | None = None) -> int:
    """Console script ``dcbnode``."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return EXIT_FAILURE  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
