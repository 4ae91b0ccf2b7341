"""Rebuilding retrieved instances in helper processes, outside the association's thread and GIL.

A C-GET or C-MOVE rebuilds each instance (header from the volume's dictionary, HTJ2K decoded for a
native peer) while the previous one is sent.  In a worker process that work shares one GIL with every
association of that worker; here it runs in helper processes of the worker (started with ``spawn`` on
the first retrieve, each with its own archive connection, at normal priority: a peer waits for their
work).  Per association the lookahead of :func:`~.transfer.prepared_instances` still bounds
memory: at most ``lookahead + 1`` rebuilt instances are held for it, the bytes of one travelling
through the pool's pipe at a time.

A helper that dies (e.g. killed) fails no retrieve: the instance is rebuilt in the association's own
thread, and the pool is started anew for the next one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..archive import Archive
from ..archive.retrieve import RetrieveMatch
from .wire import EncodedDataset

__all__ = ["RebuildPool"]

log = logging.getLogger("dcbnode.retrieve")

#: The archive of a helper process (set by its initializer).
_archive: Archive | None = None


def _start_helper(parent: int, data_dir: str, database_url: str, log_level: str, name: str) -> None:
    """A helper process's initializer: end with the worker, log like it, open the archive."""
    global _archive
    from .logging_setup import configure_logging

    # Not PR_SET_PDEATHSIG: it fires when the *thread* that started the helper ends (a retrieve's thread).
    threading.Thread(target=_end_with, args=(parent,), name="dcbnode-parent-watch", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the node, which stops us
    configure_logging(log_level, name)
    _archive = Archive(Path(data_dir), database_url, compresses=False)


def _end_with(parent: int) -> None:
    """Exit once ``parent`` (the worker) is gone, even if it was killed."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK)
    os._exit(1)


#: How often a helper checks that its worker is still there (seconds).
_PARENT_CHECK = 1.0


def _rebuild(match: RetrieveMatch, accepted: Mapping[str, frozenset[str]], location: tuple[str, int] | None,
             preference: Sequence[str]) -> tuple[str, str, str, bytes | None, str]:
    """In a helper: :func:`~.transfer.prepare`, as the fields of its :class:`~.wire.EncodedDataset`."""
    from .transfer import prepare

    assert _archive is not None
    dataset = prepare(_archive, match, accepted, location, preference)
    return (dataset.SOPClassUID, dataset.SOPInstanceUID, str(dataset.file_meta.TransferSyntaxUID), dataset.encoded,
            dataset.reason)


class RebuildPool:
    """``processes`` helper processes rebuilding instances for the retrieves of this process."""

    def __init__(self, data_dir: Path, database_url: str, *, processes: int, log_level: str, name: str) -> None:
        self._args = (os.getpid(), str(data_dir), database_url, log_level, name)
        self._processes = processes
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def rebuild(self, match: RetrieveMatch, accepted: Mapping[str, frozenset[str]],
                location: tuple[str, int] | None, preference: Sequence[str]) -> EncodedDataset | None:
        """The instance rebuilt by a helper; None if the pool broke (the caller rebuilds it itself)."""
        executor = self._running()
        try:
            fields = executor.submit(_rebuild, match, dict(accepted), location, tuple(preference)).result()
        except BrokenProcessPool:
            log.warning("a rebuild helper process ended; rebuilding %s in the association's thread",
                        match.sop_instance_uid)
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            return None
        return EncodedDataset(*fields)

    def _running(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(self._processes, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_start_helper, initargs=self._args)
            return self._executor

    def close(self) -> None:
        """Stop the helpers (after the rebuilds they are doing)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
