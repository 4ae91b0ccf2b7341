"""Deferred compression: the background thread that compresses series once they go quiet (in the node,
it runs in its own niced process, apart from the association workers: ``dcbnode.cli.processes``).

With ``compression = "deferred"`` the node acknowledges a C-STORE once the instance's frames are
durable *uncompressed* (codec ``raw``) and indexed, which keeps HTJ2K encoding off the response path.
This thread then compacts each series volume that holds raw frames once no instance has arrived for
it for ``delay`` seconds: :func:`~.compaction.compact_volume` re-encodes the records (verified
lossless) into the volume's next generation, crash-safe at every step, and clears the volume's
``pending_compression`` mark in the index.  Volumes marked before a restart are picked up again.
While ``dcbnode-admin backup`` copies the volumes, compression waits (:mod:`.rewrite_lock`).  With
``watch_index`` the volumes come from the index's marks, each idle since its file last changed: what
other processes and hosts store is compressed too (:meth:`Compressor.note_from_index`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from sqlalchemy.exc import DBAPIError

from ..dcbs import DcbsError
from ..index.database import OutageNotice
from ..index.writer import clear_compression_pending, compression_pending
from .archive import Archive
from .compaction import compact_volume
from .rewrite_lock import RewritesPaused

log = logging.getLogger("dcbnode.compress")

#: How long a failed volume waits before it is tried again.
RETRY_SECONDS = 60.0
#: Lower CPU priority of the thread (Linux ``nice`` of one thread): ingest comes first.
NICENESS = 10


class CompressionStopped(Exception):
    """Raised inside a compaction to abandon it because the node is stopping."""


class Compressor:
    """Compresses idle series volumes in one background thread (see the module docstring)."""

    def __init__(self, archive: Archive, delay: float, *, watch_index: bool = False) -> None:
        """``watch_index``: other processes store into the archive (the node's workers, other hosts): each
        round, take the volumes to compress from the index (see :meth:`note_from_index`)."""
        self.archive = archive
        self.delay = delay
        self.watch_index = watch_index
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dcbnode-compressor", daemon=True)
        self._failed: dict[str, float] = {}  # stem → when to try again
        self._held_by_backup = False  # logged once when a backup starts holding compression, once when it ends

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the thread; a compaction in progress is abandoned (its temporary file removed, the volume
        left as it was).  False if the thread did not end within ``timeout``."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def run_once(self, delay: float | None = None) -> int:
        """Compress every volume idle for ``delay`` seconds (default: the configured delay), now, in this
        thread; returns how many were compressed."""
        done = 0
        for stem in self.archive.pending.take_idle(self.delay if delay is None else delay):
            if self._stopping.is_set():
                self.archive.pending.note(stem)
                continue
            done += self._compress(stem)
        return done

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # not permitted here: run at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        outage = OutageNotice(log, "deferred compression")
        while not self._stopping.wait(min(1.0, max(self.delay / 4, 0.05))):
            self._retry_failed()
            try:
                if self.watch_index:
                    self.note_from_index()
                self.run_once()
                outage.succeeded()
            except DBAPIError as exc:  # the index is down: said once, not a traceback every round
                outage.failed(exc)
            except Exception:  # never let the thread die: the next round tries again
                log.exception("deferred compression failed")

    def note_from_index(self) -> None:
        """Note the volumes the index marks as holding raw frames, each as idle since its current file last
        changed (every append changes it): other processes' stores, here and on other hosts.

        Two compressors may pick the same volume (two hosts): :func:`~.compaction.compact_volume` holds the
        volume's ``flock`` while it rewrites, and the later one finds it replaced and skips it.
        """
        with self.archive.index.engine.connect() as connection:
            stems = compression_pending(connection)
        for stem in stems:
            if stem in self._failed:
                continue
            path = self.archive.current_volume_file(stem)
            try:
                age = time.time() - path.stat().st_mtime if path is not None else self.delay
            except FileNotFoundError:  # replaced meanwhile: look again next round
                continue
            self.archive.pending.note(stem, age=max(0.0, age))

    def _compress(self, stem: str) -> int:
        """Compress the current generation of the volume ``stem``; 1 if it was rewritten."""
        path = self.archive.current_volume_file(stem)
        if path is None:  # its instances were all deleted
            with self.archive.index.session() as session:
                clear_compression_pending(session, stem)
            return 0
        started = time.perf_counter()
        try:
            result = compact_volume(self.archive, path, pause=self._pause, wait=False)
        except CompressionStopped:
            self.archive.pending.note(stem)  # the index still marks it: the next start does it
            return 0
        except RewritesPaused:
            if not self._held_by_backup:
                log.info("deferred compression waits while a backup copies the volumes")
                self._held_by_backup = True
            self.archive.pending.note(stem)  # after the backup
            return 0
        except Exception as exc:  # a full disk, a volume that needs a reindex first, or a bug: later again
            expected = isinstance(exc, (DcbsError, OSError))
            log.error("compressing %s failed, retrying in %.0f s: %s", path, RETRY_SECONDS, exc,
                      exc_info=not expected)
            self._failed[stem] = time.monotonic() + RETRY_SECONDS
            return 0
        if self._held_by_backup:
            log.info("deferred compression resumed after the backup")
            self._held_by_backup = False
        if result is None:
            return 0
        log.info("compressed %s: %d instances, %d → %d bytes, %.1f s", result.new_volume, result.live_records,
                 result.bytes_before, result.bytes_after, time.perf_counter() - started)
        return 1

    def _retry_failed(self) -> None:
        now = time.monotonic()
        for stem, when in list(self._failed.items()):
            if when <= now:
                del self._failed[stem]
                self.archive.pending.note(stem)

    def _pause(self, step: str) -> None:
        """Between compaction steps: abandon the rewrite while it is still only a temporary file."""
        if step == "copying" and self._stopping.is_set():
            raise CompressionStopped

