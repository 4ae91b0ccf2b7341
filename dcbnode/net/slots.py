"""``max_associations`` for the node as a whole: association slots counted across worker processes.

pynetdicom counts associations per process (``AE.maximum_associations``).  The node's workers share one
count instead: a table of per-worker counters in shared memory, created by the main process before it
starts the workers (inherited over ``fork``), read and changed under a POSIX record lock (``lockf``) on
an unlinked temporary file, also inherited.  The kernel drops a process's record lock when it dies, so a
worker killed in the middle never leaves the table locked; and the main process zeroes a dead worker's
counter (:meth:`AssociationSlots.reset`) before it starts its replacement, so its slots come back.

A second table counts each worker's open *connections* (from ``accept`` to close, associated or not):
a worker about to accept checks that no other worker has fewer (:meth:`AssociationSlots.least_busy`),
so that the connections spread over the workers' cores (see :mod:`.listener`).
"""

from __future__ import annotations

import fcntl
import mmap
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["AssociationSlots"]

_COUNTER = 8  # bytes per worker (a signed 64-bit count)


class AssociationSlots:
    """At most ``limit`` associations at once over ``workers`` processes."""

    def __init__(self, limit: int, workers: int) -> None:
        self.limit = limit
        self.workers = workers
        # anonymous and shared: children see the tables (associations, then connections, per worker)
        self._memory = mmap.mmap(-1, 2 * _COUNTER * workers)
        table = memoryview(self._memory).cast("q")
        self._counts, self._connections = table[:workers], table[workers:]
        self._lock_file = tempfile.TemporaryFile()  # noqa: SIM115 - held open for the node's life
        self._thread_lock = threading.Lock()  # lockf excludes other processes, not this one's threads

    def acquire(self, worker: int) -> bool:
        """Take a slot for an association of ``worker``; False if the node has ``limit`` already."""
        with self._locked():
            if sum(self._counts) >= self.limit:
                return False
            self._counts[worker] += 1
            return True

    def release(self, worker: int) -> None:
        """Give back a slot ``worker`` took."""
        with self._locked():
            self._counts[worker] = max(0, self._counts[worker] - 1)

    def reset(self, worker: int) -> None:
        """Forget every slot and connection of ``worker`` (the main process, once the worker is dead)."""
        with self._locked():
            self._counts[worker] = 0
            self._connections[worker] = 0

    def connection_opened(self, worker: int) -> None:
        """``worker`` accepted a connection."""
        with self._locked():
            self._connections[worker] += 1

    def connection_closed(self, worker: int) -> None:
        """A connection ``worker`` accepted ended."""
        with self._locked():
            self._connections[worker] = max(0, self._connections[worker] - 1)

    def least_busy(self, worker: int) -> bool:
        """Whether no other worker has fewer open connections than ``worker``."""
        with self._locked():
            return self._connections[worker] <= min(self._connections)

    def in_use(self) -> int:
        """Associations holding a slot now, over all workers."""
        with self._locked():
            return sum(self._counts)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self._lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._lock_file.fileno(), fcntl.LOCK_UN)
