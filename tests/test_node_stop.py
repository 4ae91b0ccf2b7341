"""SIGTERM always stops the node promptly: idle, with port probes that never send an A-ASSOCIATE-RQ,
right after start-up, and in the middle of a C-STORE stream (acknowledged instances are kept)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pydicom
from conftest import child_pids, indexed_count, read_back, stop_node, wait_until
from faithful import ct_series
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

#: An idle node must be gone well within this (it takes well under a second).
IDLE_STOP_SECONDS = 5.0


def _timed_stop(node, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    code = stop_node(node, timeout=timeout)
    return code, time.monotonic() - started


def _assert_clean_log(node) -> None:
    text = node.log()
    assert "Traceback" not in text, text[-3000:]
    assert "InvalidEventError" not in text, text[-3000:]


def test_sigterm_right_after_start_stops(running_node):
    """Right after start-up the wait-for-port probe connection is still being set up (and the main
    thread has just gone to sleep): the stop must not depend on which thread the signal lands in."""
    for name in ("first", "second", "third"):
        node = running_node(name=name)
        code, seconds = _timed_stop(node, IDLE_STOP_SECONDS)
        assert code == 0
        assert seconds < IDLE_STOP_SECONDS
        _assert_clean_log(node)


def test_no_thread_but_the_waiting_one_can_take_a_stop_signal(running_node):
    """Every thread of the node blocks SIGTERM, SIGINT and SIGHUP, except the main thread waiting for them
    in sigwait(): a signal delivered to any other thread (threads inherit the mask they start with;
    numpy's OpenBLAS starts one at import) would kill the node with the default action (exit -15)."""
    node = running_node()
    main = node.process.pid
    # The main process and its workers and compressor (started right after the port opens), each with
    # its threads once it has started serving.

    def threads() -> list[tuple[int, str]]:
        return [(pid, tid) for pid in [main, *child_pids(main)] for tid in os.listdir(f"/proc/{pid}/task")
                if int(tid) != pid]

    assert wait_until(lambda: len({pid for pid, _ in threads()}) >= 2)  # the server, association and
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # library threads of the workers at least
    for pid, tid in threads():
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        unblocked = {s.name for s in wanted if not blocked & (1 << (s - 1))}
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        assert not unblocked, f"thread {tid} ({name}) does not block {unblocked}"


def test_sigterm_with_idle_probe_connections_stops_quickly(running_node):
    node = running_node()
    held = socket.create_connection((node.host, node.port))  # sends nothing, stays open
    closed = socket.create_connection((node.host, node.port))
    closed.close()
    try:
        # Both accepted before the stop (the closed one logged, after start_node's own wait-for-port
        # probe), so the stop has to end the held one itself.
        assert wait_until(lambda: node.log().count("closed without association") >= 2)
        time.sleep(0.2)
        code, seconds = _timed_stop(node, IDLE_STOP_SECONDS)
        assert code == 0
        assert seconds < IDLE_STOP_SECONDS, node.log()[-3000:]
        held.settimeout(2.0)
        assert held.recv(1024) == b""  # the node closed the probe's connection (no A-ABORT: none was asked for)
    finally:
        held.close()
    _assert_clean_log(node)
    assert node.log().count("closed without association") == 3  # start_node's probe, closed, held


def _ct_series(count: int) -> list[pydicom.Dataset]:
    return ct_series(count)


def test_sigterm_during_c_store_stream_keeps_acknowledged_and_stops(running_node):
    node = running_node()
    datasets = _ct_series(400)
    acknowledged: list[str] = []
    refused: list[int] = []

    def send() -> None:
        ae = AE(ae_title="STOPSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CTImageStorage, str(datasets[0].file_meta.TransferSyntaxUID))
        assoc = ae.associate(node.host, node.port, ae_title=node.aet)
        assert assoc.is_established
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if "Status" not in status:  # aborted by the stop
                    return
                if status.Status == 0:
                    acknowledged.append(str(ds.SOPInstanceUID))
                else:
                    refused.append(int(status.Status))
        finally:
            if assoc.is_established:
                assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    assert wait_until(lambda: len(acknowledged) >= 20, 60)
    code, seconds = _timed_stop(node, 20)
    sender.join(30)
    assert not sender.is_alive()
    assert code == 0
    # The C-STORE in progress is finished (CT_small stores in milliseconds), then the association ends.
    assert seconds < IDLE_STOP_SECONDS, node.log()[-3000:]
    assert 20 <= len(acknowledged) < len(datasets)
    assert set(refused) <= {0xA700}  # "the node is stopping": refused, never half-stored
    archive = read_back(node.data_dir)
    try:
        assert indexed_count(archive) >= len(acknowledged)
        for uid in acknowledged:
            with archive.open_instance(uid):
                pass
    finally:
        archive.close()
    _assert_clean_log(node)
