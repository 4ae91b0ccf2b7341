"""Storage Commitment Push Model SCP, end to end with stock pynetdicom peers: the report on the requesting
association, on a new association when the requestor released it, after a node restart, with references
to instances never sent, stored under another class, or damaged on disk."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import RunningNode, read_back, scu_store, wait_until
from peers import LOOPBACK, free_port
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

MODALITY = "MODALITY"
#: (event type, event information) of each report received
Reports = list[tuple[int, Dataset]]
_WAIT = 30.0


def _ct(series: str) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _request(references: list[tuple[str, str]], transaction: str | None = None) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction or generate_uid()
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _collector(reports: Reports, arrived: threading.Event) -> Any:
    def on_report(event: Any) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        arrived.set()
        return 0x0000, None

    return on_report


def _ask(node: RunningNode, request: Dataset, *, wait: bool, calling: str = MODALITY) -> tuple[Dataset, Reports]:
    """N-ACTION from a pynetdicom SCU; with ``wait`` the association stays open until a report arrives."""
    reports: Reports = []
    arrived = threading.Event()
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, _collector(reports, arrived))])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        if wait and status.Status == 0:
            assert arrived.wait(_WAIT), node.log()[-3000:]
    finally:
        assoc.release()
    return status, reports


@contextlib.contextmanager
def _modality_scp(port: int) -> Iterator[tuple[Reports, threading.Event]]:
    """The modality's side for reports on a new association: a pynetdicom SCP that accepts the SCP role."""
    reports: Reports = []
    arrived = threading.Event()
    ae = AE(ae_title=MODALITY)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server((LOOPBACK, port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, _collector(reports, arrived))])
    try:
        yield reports, arrived
    finally:
        server.shutdown()


def _start(running_node: Any, port: int, allow: tuple[str, ...] | None = None, **kwargs: Any) -> RunningNode:
    peer: dict[str, Any] = {"host": LOOPBACK, "port": port, **({} if allow is None else {"allow": list(allow)})}
    return running_node(tables={"peers." + MODALITY: peer, "storage": {"commitment_retry_interval": 0.5}}, **kwargs)


def _uids(sequence: Any) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in sequence]


def _damage_first_frame(data_dir: Path, sop_instance_uid: str) -> None:
    """Flip one byte in the middle of the stored instance's first frame (its CRC no longer matches)."""
    archive = read_back(data_dir)
    try:
        with archive.open_instance(sop_instance_uid) as stored:
            entry = stored.meta.frames[0]
            offset = stored.frames_start + entry.offset + entry.length // 2
            path = Path(stored.volume.path)
    finally:
        archive.close()
    with path.open("r+b") as volume:
        volume.seek(offset)
        byte = volume.read(1)
        volume.seek(offset)
        volume.write(bytes([byte[0] ^ 0xFF]))


def test_report_on_the_same_association(running_node) -> None:
    node = _start(running_node, free_port(), compression="inline")
    good, conflict, damaged = _ct(generate_uid()), _ct(generate_uid()), _ct(generate_uid())
    assert [s.Status for s in scu_store(node, [good, conflict, damaged], calling_aet=MODALITY)] == [0, 0, 0]
    ct_class = str(good.SOPClassUID)

    status, reports = _ask(node, _request([(ct_class, good.SOPInstanceUID)]), wait=True)
    assert status.Status == 0
    [(event_type, info)] = reports
    assert event_type == 1 and _uids(info.ReferencedSOPSequence) == [good.SOPInstanceUID]
    assert "FailedSOPSequence" not in info and info.RetrieveAETitle == node.aet

    _damage_first_frame(node.data_dir, damaged.SOPInstanceUID)
    never_sent = generate_uid()
    request = _request([(ct_class, good.SOPInstanceUID), (ct_class, never_sent),
                        ("1.2.840.10008.5.1.4.1.1.4", conflict.SOPInstanceUID), (ct_class, damaged.SOPInstanceUID)])
    status, reports = _ask(node, request, wait=True)
    assert status.Status == 0
    [(event_type, info)] = reports
    assert event_type == 2 and info.TransactionUID == request.TransactionUID
    assert _uids(info.ReferencedSOPSequence) == [good.SOPInstanceUID]
    failures = {str(item.ReferencedSOPInstanceUID): int(item.FailureReason) for item in info.FailedSOPSequence}
    assert failures == {never_sent: 0x0112, conflict.SOPInstanceUID: 0x0119, damaged.SOPInstanceUID: 0x0110}
    assert wait_until(lambda: node.log().count("on the same association, status 0x0000") == 2), node.log()


def test_report_on_a_new_association_after_release(running_node) -> None:
    port = free_port()
    node = _start(running_node, port)
    stored = _ct(generate_uid())
    assert scu_store(node, [stored], calling_aet=MODALITY)[0].Status == 0
    with _modality_scp(port) as (reports, arrived):
        status, same = _ask(node, _request([(str(stored.SOPClassUID), stored.SOPInstanceUID)]), wait=False)
        assert status.Status == 0 and same == []
        assert arrived.wait(_WAIT), node.log()[-3000:]
    [(event_type, info)] = reports
    assert event_type == 1 and _uids(info.ReferencedSOPSequence) == [stored.SOPInstanceUID]
    assert "on the new association, status 0x0000" in node.log()


def test_pending_request_answered_after_a_restart(running_node, database_url) -> None:
    port = free_port()
    node = _start(running_node, port, name="first", database_url=database_url)
    stored = _ct(generate_uid())
    assert scu_store(node, [stored], calling_aet=MODALITY)[0].Status == 0
    never_sent = generate_uid()
    request = _request([(str(stored.SOPClassUID), stored.SOPInstanceUID), (str(stored.SOPClassUID), never_sent)])
    status, _ = _ask(node, request, wait=False)
    assert status.Status == 0
    # Nobody listens for the report yet: the node keeps trying; killed, it keeps nothing but the index.
    assert wait_until(lambda: "not delivered (attempt 2)" in node.log(), _WAIT), node.log()[-3000:]
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(10)
    with _modality_scp(port) as (reports, arrived):
        again = _start(running_node, port, name="second", data_dir=node.data_dir, database_url=database_url)
        assert arrived.wait(_WAIT), again.log()[-3000:]
    [(event_type, info)] = reports
    assert event_type == 2 and info.TransactionUID == request.TransactionUID
    assert _uids(info.ReferencedSOPSequence) == [stored.SOPInstanceUID]
    failed = [(str(item.ReferencedSOPInstanceUID), item.FailureReason) for item in info.FailedSOPSequence]
    assert failed == [(never_sent, 0x0112)]
    assert "1 storage commitment request(s) wait for their report" in again.log()


@pytest.mark.parametrize(("calling", "request_changes", "code", "comment"), [
    ("STRANGER", {}, 0x0110, "not in the node's [peers]"),
    (MODALITY, {"TransactionUID": None}, 0x0120, "Transaction UID"),
    (MODALITY, {"ReferencedSOPSequence": None}, 0x0120, "Referenced SOP Sequence"),
    (MODALITY, {"allow": ("store",)}, 0x0124, "not allowed to commit"),
])
def test_requests_refused(running_node, calling: str, request_changes: dict[str, Any], code: int,
                          comment: str) -> None:
    allow = request_changes.pop("allow", None)
    node = _start(running_node, free_port(), allow)
    request = _request([("1.2.840.10008.5.1.4.1.1.2", generate_uid())])
    for keyword in request_changes:
        delattr(request, keyword)
    status, reports = _ask(node, request, wait=False, calling=calling)
    assert status.Status == code and comment in status.ErrorComment
    assert reports == []
    assert wait_until(lambda: "storage commitment request from " + calling + " refused" in node.log()), node.log()
    if allow is not None:
        assert "commit refused: MODALITY@" in node.log()


def test_claims_are_exclusive_and_abandoned_ones_are_taken_over(database_url: str, tmp_path: Path) -> None:
    """Two senders (as two node processes would be) on one index: one claim at a time; a claim whose
    lease has expired, or whose process on this host has ended, is free again."""
    import os
    import socket

    from dcbnode.archive.commitment import CommitmentQueue, Reference
    from dcbnode.index import Index
    from dcbnode.net.commitment_scp import _process_gone

    index = Index(database_url or f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.prepare_schema()
    try:
        first = CommitmentQueue(index, f"{socket.gethostname()}:{os.getpid()}:first", lease=3600)
        second = CommitmentQueue(index, f"{socket.gethostname()}:{os.getpid()}:second", lease=3600)
        request = first.add(generate_uid(), MODALITY, [Reference("1.2.840.10008.5.1.4.1.1.2", generate_uid())])
        assert first.due() == [request] == second.due()
        assert first.claim(request) is not None
        assert second.claim(request) is None and second.due() == []
        first.release(request, retry_in=3600)
        assert second.due() == [] and second.claim(request) is not None  # claim() ignores the retry time
        assert CommitmentQueue(index, "other:1:x", lease=0).claim(request) is not None  # lease expired
        # A claim left by a process of this host that has ended (here: a pid that cannot exist).
        dead = CommitmentQueue(index, f"{socket.gethostname()}:{2**22 + 1}:dead", lease=3600)
        dead.finish(request)
        assert first.count() == 1  # finish() by a sender that does not hold the claim changes nothing
        taken = CommitmentQueue(index, "other:1:x", lease=3600)
        taken.finish(request)
        assert first.count() == 0
        request = dead.add(generate_uid(), MODALITY, [])
        assert dead.claim(request) is not None
        assert first.release_abandoned(_process_gone) == 1 and first.claim(request) is not None
    finally:
        index.dispose()
