"""Group commit: concurrent stores into one volume committed as one batch (one lock, fsync, transaction)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from faithful import element_differences, read
from pydicom.uid import generate_uid
from test_archive import _ct_copy, _retrieve

from dcbnode.archive import Archive, StoreOutcome, volume_path_for
from dcbnode.archive.group_commit import Batch, GroupCommit
from dcbnode.dcbs import Volume


def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def _submit_all(group: GroupCommit, items: list[int]) -> list[object]:
    """Submit each item from its own thread; each thread's result, or the exception it raised."""

    def one(item: int) -> object:
        try:
            return group.submit("volume", item)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))


def test_what_queues_while_the_leader_waits_is_committed_in_its_batch() -> None:
    release = threading.Event()
    batches: list[list[int]] = []

    def commit(_key: str, batch: Batch[int]) -> list[int]:
        if batch.first == 0:
            release.wait(20)  # the leader waits (for the volume's lock) while the others queue
        batches.append(batch.take())
        return [item * 10 for item in batch.take()]

    group: GroupCommit[str, int, int] = GroupCommit(commit)
    with ThreadPoolExecutor(1) as leader:
        first = leader.submit(group.submit, "volume", 0)
        _wait_until(lambda: "volume" in group._queues)
        with ThreadPoolExecutor(5) as others:
            rest = [others.submit(group.submit, "volume", item) for item in range(1, 6)]
            _wait_until(lambda: group.waiting("volume") == 5)
            release.set()
            assert [future.result(20) for future in rest] == [10, 20, 30, 40, 50]
        assert first.result(20) == 0
    assert batches == [[0, 1, 2, 3, 4, 5]]
    assert group._queues == {}


def test_each_item_gets_its_own_outcome_and_a_failed_commit_fails_its_whole_batch() -> None:
    def commit(_key: str, batch: Batch[int]) -> list[object]:
        items = batch.take()
        if -1 in items:
            raise OSError("disk full")
        return [ValueError(item) if item % 2 else item for item in items]

    group: GroupCommit[str, int, int] = GroupCommit(commit)
    outcomes = _submit_all(group, list(range(8)))
    assert [isinstance(outcome, ValueError) for outcome in outcomes] == [bool(item % 2) for item in range(8)]
    assert [outcome for outcome in outcomes if not isinstance(outcome, Exception)] == [0, 2, 4, 6]
    assert all(isinstance(outcome, OSError) for outcome in _submit_all(group, [-1]))
    assert group._queues == {}


def test_the_lead_passes_on_to_what_queued_after_the_batch_was_taken() -> None:
    taken = threading.Event()
    go_on = threading.Event()
    batches: list[list[int]] = []

    def commit(_key: str, batch: Batch[int]) -> list[int]:
        items = batch.take()
        batches.append(items)
        if items == [0]:
            taken.set()
            go_on.wait(20)  # the batch is closed: what comes now waits for the next one
        return items

    group: GroupCommit[str, int, int] = GroupCommit(commit)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(group.submit, "volume", 0)
        taken.wait(20)
        later = [pool.submit(group.submit, "volume", item) for item in (1, 2, 3)]
        _wait_until(lambda: group.waiting("volume") == 3)
        go_on.set()
        assert [future.result(20) for future in (first, *later)] == [0, 1, 2, 3]
    assert batches[0] == [0]
    assert sorted(item for batch in batches[1:] for item in batch) == [1, 2, 3]
    assert group._queues == {}


@pytest.mark.parametrize("defer_compression", [True, False])
def test_stores_queued_behind_a_locked_volume_are_committed_together(tmp_path: Path, defer_compression: bool) -> None:
    """Six threads store into one series while another process's append holds the volume: the first
    waits for the lock, the others queue; one batch stores them all, a duplicate among them is told so
    and the others are stored (bit-exact)."""
    archive = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    try:
        series = generate_uid()
        archive.store(_ct_copy(series))  # the volume exists, with its dictionary
        instances = [_ct_copy(series) for _ in range(5)]
        path = archive.volume_file(volume_path_for(read(instances[0]).SeriesInstanceUID))
        holder = os.open(path, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)  # as another process's append would
        try:
            with ThreadPoolExecutor(6) as pool:
                stores = [pool.submit(archive.store, data, defer_compression=defer_compression)
                          for data in [*instances, instances[2]]]
                _wait_until(lambda: archive._group_commit.waiting(volume_path_for(series)) == 5)
                fcntl.flock(holder, fcntl.LOCK_UN)
                outcomes = [future.result(60).outcome for future in stores]
        finally:
            os.close(holder)
        assert sorted(outcome.value for outcome in outcomes) == ["duplicate ignored", *["stored"] * 5]
        for data in instances:
            uid = read(data).SOPInstanceUID
            assert element_differences(read(data), read(_retrieve(archive, uid))) == []
        with Volume.open(path) as volume:
            kinds = [entry.header.kind.name for entry in volume.records()]
        assert kinds.count("INSTANCE") == 6  # the first store and five: the duplicate was cut back
    finally:
        archive.close()


def test_a_batch_in_which_one_store_fails_stores_the_others(tmp_path: Path) -> None:
    """Under the "reject" policy, the duplicate of a batch gets its error and the others are stored."""
    archive = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}",
                      duplicate_policy="reject")
    try:
        series = generate_uid()
        stored_before = _ct_copy(series)
        archive.store(stored_before)
        instances = [_ct_copy(series) for _ in range(3)]
        path = archive.volume_file(volume_path_for(series))
        holder = os.open(path, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            with ThreadPoolExecutor(4) as pool:
                stores = [pool.submit(archive.store, data, defer_compression=True)
                          for data in [*instances, stored_before]]
                _wait_until(lambda: archive._group_commit.waiting(volume_path_for(series)) == 3)
                fcntl.flock(holder, fcntl.LOCK_UN)
                results = []
                for future in stores:
                    try:
                        results.append(future.result(60).outcome)
                    except Exception as exc:
                        results.append(type(exc).__name__)
        finally:
            os.close(holder)
        assert sorted(map(str, results)) == sorted(["DuplicateInstanceError", *[str(StoreOutcome.STORED)] * 3])
    finally:
        archive.close()
