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
        self._users: dict[int, int] = {}  # id(volume) -> borrowers

    @contextmanager
    def borrow(self, path: Path, *, writable: bool, create: bool | None = None) -> Iterator[Volume]:
        """Use the volume at ``path``; a missing one is created if ``create`` (default: ``writable``),
        else :class:`~dcbnode.dcbs.VolumeNotFoundError` is raised."""
        key = (path, writable)
        with self._lock:
            volume = self._open.get(key)
            if volume is not None:
                self._open.move_to_end(key)
                self._users[id(volume)] = self._users.get(id(volume), 0) + 1
        if volume is None:
            opened = Volume.open(path, writable=writable, create=writable if create is None else create)
            with self._lock:
                volume = self._open.setdefault(key, opened)
                self._users[id(volume)] = self._users.get(id(volume), 0) + 1
            if volume is not opened:  # another thread opened it meanwhile
                opened.close()
        try:
            yield volume
        finally:
            with self._lock:
                self._release(volume)
                self._evict()

    def forget(self, path: Path) -> None:
        """Stop handing out ``path``'s open descriptors (compaction replaced the file).

        Descriptors still in use are closed by their last borrower.
        """
        with self._lock:
            for key in [key for key in self._open if key[0] == path]:
                volume = self._open.pop(key)
                if not self._users.get(id(volume)):
                    volume.close()

    def close(self) -> None:
        """Close every idle volume."""
        with self._lock:
            for key in list(self._open):
                if not self._users.get(id(self._open[key])):
                    self._open.pop(key).close()

    def _release(self, volume: Volume) -> None:
        remaining = self._users[id(volume)] - 1
        if remaining:
            self._users[id(volume)] = remaining
            return
        del self._users[id(volume)]
        if volume not in self._open.values():  # forgotten while in use
            volume.close()

    def _evict(self) -> None:
        for key in list(self._open):
            if len(self._open) <= self._capacity:
                return
            if not self._users.get(id(self._open[key])):
                self._open.pop(key).close()
