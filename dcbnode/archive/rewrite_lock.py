"""The data folder's rewrite lock: no volume file is replaced while a backup copies the volumes.

Compaction (``dcbnode-admin compact`` and the node's deferred compression) replaces a volume by its
next generation and unlinks the old file; so does the clean-up of an interrupted compaction.  Each
such rewrite holds a *shared* ``flock`` on ``<data_dir>/rewrite.lock`` from before it reads the volume
until the old file is gone.  ``dcbnode-admin backup`` holds it *exclusively* from before it copies the
index until the last volume is copied, so that every file the index copy points to is still there,
unchanged but for appended records, when it is copied.  Appends (C-STOREs, tombstones) go on meanwhile.

The lock is taken by processes, not threads, on their own descriptors; the kernel drops it when a
process dies, so a killed backup never leaves compaction paused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..dcbs import DcbsError

LOCK_NAME = "rewrite.lock"


class RewritesPaused(DcbsError):
    """A backup is copying the volumes: rewriting one now is not allowed; try again later."""


@contextlib.contextmanager
def _locked(data_dir: Path, operation: int, on_wait: Callable[[], None] | None) -> Iterator[None]:
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno != errno.EWOULDBLOCK:
                raise
            if on_wait is None:
                raise RewritesPaused(f"{data_dir}: a backup is copying the volumes; volumes are rewritten "
                                     "after it") from None
            on_wait()
            fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the flock


def rewriting(data_dir: Path, *, wait: bool = True) -> contextlib.AbstractContextManager[None]:
    """Hold the lock shared while replacing a volume file; without ``wait``, raise :class:`RewritesPaused`
    at once if a backup holds it."""
    return _locked(data_dir, fcntl.LOCK_SH, (lambda: None) if wait else None)


def rewrites_paused(data_dir: Path, on_wait: Callable[[], None] | None = None
                    ) -> contextlib.AbstractContextManager[None]:
    """Hold the lock exclusively: no volume is replaced until the block ends.  Waits for the rewrites in
    progress to finish (calling ``on_wait()`` first if it has to)."""
    return _locked(data_dir, fcntl.LOCK_EX, on_wait or (lambda: None))
