"""Open volume files, shared between threads and closed when unused for long."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..dcbs import Volume


class VolumePool:
    """Keeps at most ``capacity`` idle volumes open; a volume in use is never closed under its user."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[Path, bool], Volume] = OrderedDict()
        self._users: dict[tuple[Path, bool], int] = {}

    @contextmanager
    def borrow(self, path: Path, *, writable: bool) -> Iterator[Volume]:
        """Use the volume at ``path`` (created when ``writable`` and missing)."""
        key = (path, writable)
        with self._lock:
            volume = self._open.get(key)
            if volume is not None:
                self._open.move_to_end(key)
            self._users[key] = self._users.get(key, 0) + 1
        try:
            if volume is None:
                volume = Volume.open(path, writable=writable, create=writable)
                with self._lock:
                    existing = self._open.setdefault(key, volume)
                if existing is not volume:  # another thread opened it meanwhile
                    volume.close()
                    volume = existing
            yield volume
        finally:
            with self._lock:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                self._evict()

    def forget(self, path: Path) -> None:
        """Close the pooled descriptors of ``path`` (after compaction replaced the file)."""
        with self._lock:
            for key in [key for key in self._open if key[0] == path and key not in self._users]:
                self._open.pop(key).close()

    def close(self) -> None:
        """Close every idle volume."""
        with self._lock:
            for key in [key for key in self._open if key not in self._users]:
                self._open.pop(key).close()

    def _evict(self) -> None:
        for key in list(self._open):
            if len(self._open) <= self._capacity:
                return
            if key not in self._users:
                self._open.pop(key).close()
