"""Group commit: stores into one volume that arrive together are appended, fsynced and indexed together.

A series volume takes one appender at a time (its lock is held through the write, the fsync and the
index commit, so that a failed store can be cut off the end again).  When several associations of one
process store into the same series at once, each used to wait for the lock, then append, fsync and
commit alone.  Here the first store to arrive *leads*: once it holds the volume, it commits its own
instance and every one that queued up meanwhile in one batch (one write pass, one fsync, one index
transaction), then hands the lead to the first store that queued after that.  Under no contention a batch is one
instance and nothing waits; the busier the volume, the larger the batches.

Only the threads of one process batch together; other processes (workers, ``dcbnode-admin import``,
other hosts) still take turns on the volume's ``flock``, each with its own batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batch", "GroupCommit"]

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")


class _Waiter(Generic[I, R]):
    """One submitted item, waiting for its outcome (or for the lead)."""

    __slots__ = ("error", "item", "lead", "result", "woken")

    def __init__(self, item: I) -> None:
        self.item = item
        self.woken = threading.Event()
        self.lead = False
        self.result: R | None = None
        self.error: BaseException | None = None


class Batch(Generic[I]):
    """The items a leader commits: its own (:attr:`first`), and those queued until it calls :meth:`take`
    — as late as it can, once it holds the volume, so that every store that queued while it waited
    for the volume joins the batch."""

    def __init__(self, first: I, take: Callable[[], list[I]]) -> None:
        self.first = first
        self._take = take
        self._items: list[I] | None = None

    def take(self) -> list[I]:
        """The batch: the first item and every one queued behind it so far.  The first call closes it
        (later items wait for the next batch); later calls return the same list."""
        if self._items is None:
            self._items = self._take()
        return self._items


class GroupCommit(Generic[K, I, R]):
    """Batches the items submitted for one key by concurrent threads.

    ``commit(key, batch)`` commits a :class:`Batch` and returns one outcome per item of
    ``batch.take()``, in order: its result, or the exception that item's submitter must raise.  If
    ``commit`` itself raises, every item of the batch gets that exception.  Batches of one key never
    overlap; batches of different keys may.
    """

    def __init__(self, commit: Callable[[K, Batch[I]], Sequence[R | BaseException]]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        #: key → the waiters queued behind the batch being committed (the key is absent when none is)
        self._queues: dict[K, list[_Waiter[I, R]]] = {}

    def waiting(self, key: K) -> int:
        """How many items of ``key`` wait for the next batch (not counting the one being committed)."""
        with self._lock:
            return len(self._queues.get(key, ()))

    def submit(self, key: K, item: I) -> R:
        """Commit ``item`` (alone or with others of ``key``) and return its result, or raise its error."""
        waiter: _Waiter[I, R] = _Waiter(item)
        with self._lock:
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = []
                waiter.lead = True
            else:
                queue.append(waiter)
        if not waiter.lead:
            waiter.woken.wait()  # either done by a leader, or handed the lead
        if waiter.lead:
            self._lead(key, waiter)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]  # set by the batch that held it

    def _lead(self, key: K, own: _Waiter[I, R]) -> None:
        """Commit ``own`` with what queues for ``key`` until the batch is taken; then pass the lead on to
        the first store that queued after that, or end it."""
        taken: list[_Waiter[I, R]] = []

        def take() -> list[I]:
            with self._lock:
                taken[:] = [own, *self._queues[key]]
                self._queues[key] = []
            return [waiter.item for waiter in taken]

        batch = Batch(own.item, take)
        try:
            outcomes = self._commit(key, batch)
            batch.take()
            if len(outcomes) != len(taken):
                raise AssertionError(f"group commit returned {len(outcomes)} outcomes for {len(taken)} items")
            for waiter, outcome in zip(taken, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    waiter.error = outcome
                else:
                    waiter.result = outcome
        except BaseException as exc:
            batch.take()
            for waiter in taken:
                waiter.error = exc
        finally:
            with self._lock:
                queued = self._queues[key]
                if queued:
                    successor = queued.pop(0)
                    successor.lead = True
                    successor.woken.set()
                else:
                    del self._queues[key]
            for waiter in taken[1:]:
                waiter.woken.set()
