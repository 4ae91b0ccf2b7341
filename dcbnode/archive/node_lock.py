"""The data folder a node runs on: usable, and not served by another node at the same time.

A node holds an ``fcntl.flock`` on ``<data_dir>/node.lock`` for its whole life:

* with the SQLite index, an **exclusive** lock: one node per data folder.  A second node would run
  recovery on a live archive (cutting "torn" records another process is writing) and SQLite is not
  meant to be shared by two writers' worth of recovery and ingest;
* with PostgreSQL, a **shared** lock: several nodes may serve one data folder and one database (the
  scale-out design), while a SQLite node cannot start on a folder they use, nor they on its folder.

The lock belongs to the open file description, which the kernel releases when the last descriptor to it
closes, so it needs no clean-up after a crash (``kill -9`` included).  Take it in the main (supervisor)
process only: the descriptor is not inheritable across ``exec``, and worker processes that are forked
share the parent's lock instead of competing for it.  ``dcbnode-admin`` never takes it (its commands are
made to run beside the node).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_NAME", "DataDirError", "NodeLock", "prepare_data_dir"]

LOCK_NAME = "node.lock"


class DataDirError(Exception):
    """The data folder cannot be used; the message says why and what to do."""


def prepare_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` (and its parents) if missing, and check that it is a directory.

    Raises :class:`DataDirError` with one line naming the folder and the reason.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataDirError(f"data folder {data_dir} is not a directory; "
                           "set node.data_dir to a folder (it is created if missing)") from None
    except OSError as exc:
        raise DataDirError(f"cannot create data folder {data_dir}: {exc.strerror or exc}; "
                           "set node.data_dir to a writable folder on a local disk") from None
    if not data_dir.is_dir():
        raise DataDirError(f"data folder {data_dir} is not a directory")


class NodeLock:
    """The data folder's lock, held until :meth:`release` (or the process ends)."""

    def __init__(self, data_dir: Path, *, exclusive: bool) -> None:
        """Take the lock; :class:`DataDirError` when another node holds it or the folder is unusable.

        ``exclusive``: True for a node with the SQLite index, False (shared) for PostgreSQL.
        """
        self.path = data_dir / LOCK_NAME
        try:
            # O_CLOEXEC (Python's default): a program this node starts never holds the lock.
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(f"cannot write in data folder {data_dir} ({self.path}: {exc.strerror or exc}); "
                               "set node.data_dir to a writable folder on a local disk") from None
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder()
            self.release()
            if exc.errno != errno.EWOULDBLOCK:
                raise DataDirError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            raise DataDirError(f"data folder {data_dir} is in use by another dcbnode ({holder}): stop it first, "
                               "or give this node its own node.data_dir (nodes share a data folder only when "
                               "all of them use PostgreSQL)") from None
        # Who holds it, for the message above (with shared locks: the node that started last).
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}, {'SQLite' if exclusive else 'PostgreSQL'} index\n".encode(), 0)

    def _holder(self) -> str:
        """What the lock file says about who holds it, e.g. ``pid 1234, SQLite index``."""
        assert self._fd is not None
        with contextlib.suppress(OSError):
            return os.pread(self._fd, 200, 0).decode("ascii", "replace").strip() or "unknown process"
        return "unknown process"

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
