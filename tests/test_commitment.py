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
from test_admin import admin, admin_json

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


#: (0000,0100) Command Field = 8100H (N-EVENT-REPORT-RSP), as it appears in an encoded command set.
_N_EVENT_REPORT_RSP = b"\x00\x00\x00\x01\x02\x00\x00\x00\x00\x81"


class _Requestor:
    """The requestor's side of reports on its own association: the reports received, and how many of its
    answers have actually left (pynetdicom sends an answer after the handler returns, so the requestor
    must not release before: an answer after the A-RELEASE-RQ is a protocol error the node cannot take,
    PS3.8 Table 9-10, and it sends the report again on a new association)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.reports: Reports = []
        self.answered = 0
        self.gate = gate  #: no report is answered before it is set

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_EVENT_REPORT, self._report), (evt.EVT_PDU_SENT, self._pdu_sent)]

    def _report(self, event: Any) -> tuple[int, None]:
        assert self.gate is None or self.gate.wait(_WAIT)
        self.reports.append((event.event_type, event.event_information))
        return 0x0000, None

    def _pdu_sent(self, event: Any) -> None:
        for item in getattr(event.pdu, "presentation_data_value_items", []):
            value = item.presentation_data_value  # message control header, then the fragment
            if value[0] & 0x01 and _N_EVENT_REPORT_RSP in value:  # a command fragment
                self.answered += 1

    def wait_answered(self, count: int, node: RunningNode) -> None:
        assert wait_until(lambda: self.answered >= count, _WAIT), node.log()[-3000:]


def _ask(node: RunningNode, request: Dataset, *, wait: bool, calling: str = MODALITY) -> tuple[Dataset, Reports]:
    """N-ACTION from a pynetdicom SCU; with ``wait`` the association stays open until a report has been
    received and answered."""
    requestor = _Requestor()
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, evt_handlers=requestor.handlers())
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
        if wait and status.Status == 0:
            requestor.wait_answered(1, node)
    finally:
        assoc.release()
    return status, requestor.reports


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


def _start(running_node: Any, port: int, allow: tuple[str, ...] | None = None, give_up_after: float = 3600.0,
           retry_interval: float = 0.5, **kwargs: Any) -> RunningNode:
    peer: dict[str, Any] = {"host": LOOPBACK, "port": port, **({} if allow is None else {"allow": list(allow)})}
    storage = {"commitment_retry_interval": retry_interval, "commitment_give_up_after": give_up_after}
    return running_node(tables={"peers." + MODALITY: peer, "storage": storage}, **kwargs)


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
    lease has expired, or whose process on this host has ended, is free again; a repeated request is
    kept once, a conflicting one refused."""
    import os
    import socket

    from dcbnode.archive.commitment import CommitmentQueue, Reference, TransactionConflict
    from dcbnode.index import Index
    from dcbnode.net.commitment_scp import _process_gone

    index = Index(database_url or f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.prepare_schema()
    try:
        first = CommitmentQueue(index, f"{socket.gethostname()}:{os.getpid()}:first", lease=3600)
        second = CommitmentQueue(index, f"{socket.gethostname()}:{os.getpid()}:second", lease=3600)
        references = [Reference("1.2.840.10008.5.1.4.1.1.2", generate_uid())]
        transaction = generate_uid()
        admitted = first.admit(transaction, MODALITY, references)
        assert admitted.pending is not None and not admitted.repeat
        request = admitted.pending.id
        assert first.due() == [] == second.due() and second.claim(request) is None  # admitted claimed
        # The same request again: kept once; its sender holds it, so nobody else reports it now.
        again = second.admit(transaction, MODALITY, references)
        assert again.repeat and again.pending is None and first.count() == 1
        with pytest.raises(TransactionConflict, match="with other references"):
            second.admit(transaction, MODALITY, [*references, Reference("1.2.840.10008.5.1.4.1.1.2", generate_uid())])
        with pytest.raises(TransactionConflict, match="for another AE"):
            second.admit(transaction, "OTHER", references)
        first.release(request, 0, "refused")
        assert first.due() == [request] == second.due()
        assert first.claim(request) is not None
        assert second.claim(request) is None and second.due() == []
        assert first.renew(request) and not second.renew(request)
        first.release(request, 3600, "refused")
        assert second.due() == [] and second.claim(request) is not None  # claim() ignores the retry time
        assert CommitmentQueue(index, "other:1:x", lease=0).claim(request) is not None  # lease expired
        # A claim left by a process of this host that has ended (here: a pid that cannot exist).
        dead = CommitmentQueue(index, f"{socket.gethostname()}:{2**22 + 1}:dead", lease=3600)
        dead.finish(request)
        assert first.count() == 1  # finish() by a sender that does not hold the claim changes nothing
        taken = CommitmentQueue(index, "other:1:x", lease=3600)
        taken.finish(request)
        assert first.count() == 0
        # Once answered, the Transaction UID may come again: a new request.
        anew = first.admit(transaction, MODALITY, references)
        assert not anew.repeat and anew.pending is not None
        first.finish(anew.pending.id)
        left = dead.admit(generate_uid(), MODALITY, references).pending
        assert left is not None and first.claim(left.id) is None
        assert first.release_abandoned(_process_gone) == 1 and first.claim(left.id) is not None
    finally:
        index.dispose()


def _ask_on_one_association(node: RunningNode, requests: list[Dataset], *, reports_expected: int,
                            gate: threading.Event | None = None) -> tuple[list[Dataset], Reports]:
    """Several N-ACTIONs on ONE association of a stock pynetdicom SCU, sent one after the other as soon
    as each response is in (not waiting for reports); then the association stays open until
    ``reports_expected`` reports have arrived on it and been answered (or the generous wait is over), and
    is released.

    ``gate``: the SCU answers no report before it is set (once every request has been sent)."""
    requestor = _Requestor(gate)
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, evt_handlers=requestor.handlers())
    assert assoc.is_established
    try:
        statuses = []
        for number, request in enumerate(requests, 1):
            status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                            StorageCommitmentPushModelInstance, msg_id=number)
            statuses.append(status)
        if gate is not None:
            gate.set()
        if reports_expected:
            requestor.wait_answered(reports_expected, node)
            assert assoc.is_established, node.log()[-3000:]
    finally:
        assoc.release()
    return statuses, requestor.reports


def _pending_count(node: RunningNode, database_url: str = "") -> int:
    from dcbnode.archive.commitment import CommitmentQueue

    archive = read_back(node.data_dir, database_url)
    try:
        return CommitmentQueue(archive.index, "test:0:reader", lease=3600).count()
    finally:
        archive.close()


def test_two_requests_on_one_association_get_a_report_each(running_node, database_url) -> None:
    node = _start(running_node, free_port(), database_url=database_url)
    first, second = _ct(generate_uid()), _ct(generate_uid())
    assert [s.Status for s in scu_store(node, [first, second], calling_aet=MODALITY)] == [0, 0]
    ct_class = str(first.SOPClassUID)
    never_sent = generate_uid()
    requests = [_request([(ct_class, first.SOPInstanceUID)]),
                _request([(ct_class, second.SOPInstanceUID), (ct_class, never_sent)])]
    statuses, reports = _ask_on_one_association(node, requests, reports_expected=2)
    assert [status.Status for status in statuses] == [0, 0]
    by_transaction = {str(info.TransactionUID): (event_type, info) for event_type, info in reports}
    assert len(reports) == 2 and set(by_transaction) == {r.TransactionUID for r in requests}
    event_type, info = by_transaction[requests[0].TransactionUID]
    assert event_type == 1 and _uids(info.ReferencedSOPSequence) == [first.SOPInstanceUID]
    event_type, info = by_transaction[requests[1].TransactionUID]
    assert event_type == 2 and _uids(info.ReferencedSOPSequence) == [second.SOPInstanceUID]
    assert _uids(info.FailedSOPSequence) == [never_sent]
    assert wait_until(lambda: node.log().count("on the same association, status 0x0000") == 2), node.log()
    assert "new association" not in node.log()
    assert wait_until(lambda: _pending_count(node, database_url) == 0)


def test_a_repeated_transaction_uid_gets_one_report(running_node) -> None:
    """The requestor asks again with the Transaction UID whose report it has not answered yet: the same
    request, one report; the same UID with other references is refused; a third request still gets its
    report, after the first (reports go in the order of the requests, so a second report for the first
    would have come before it)."""
    node = _start(running_node, free_port())
    stored = _ct(generate_uid())
    assert scu_store(node, [stored], calling_aet=MODALITY)[0].Status == 0
    ct_class = str(stored.SOPClassUID)
    first = _request([(ct_class, stored.SOPInstanceUID)])
    conflicting = _request([(ct_class, stored.SOPInstanceUID), (ct_class, generate_uid())], first.TransactionUID)
    third = _request([(ct_class, stored.SOPInstanceUID)])
    statuses, reports = _ask_on_one_association(node, [first, first, conflicting, third], reports_expected=2,
                                                gate=threading.Event())
    assert [status.Status for status in statuses] == [0, 0, 0x0115, 0]
    assert statuses[2].ErrorComment == "Transaction UID pending with other references; use a new one"
    assert [str(info.TransactionUID) for _, info in reports] == [first.TransactionUID, third.TransactionUID]
    assert all(event_type == 1 for event_type, _ in reports)
    assert "repeats a pending one whose report is being sent right now: status 0x0000, no second report" in node.log()
    assert wait_until(lambda: _pending_count(node) == 0)


def test_requests_left_behind_by_a_release_are_reported_on_new_associations(running_node, database_url) -> None:
    """Three requests on one association, released at once: every report goes out, each exactly once (on
    the same association for any sent before the release, else on a new one)."""
    port = free_port()
    node = _start(running_node, port, database_url=database_url)
    stored = _ct(generate_uid())
    assert scu_store(node, [stored], calling_aet=MODALITY)[0].Status == 0
    requests = [_request([(str(stored.SOPClassUID), stored.SOPInstanceUID)]) for _ in range(3)]
    with _modality_scp(port) as (reports, _):
        statuses, same = _ask_on_one_association(node, requests, reports_expected=0)
        assert [status.Status for status in statuses] == [0, 0, 0]
        # Once no request is left, every delivery has happened (a request is forgotten only after its
        # report was answered, and the SCP records a report before answering it).
        assert wait_until(lambda: _pending_count(node, database_url) == 0, _WAIT), node.log()[-3000:]
    transactions = sorted(str(info.TransactionUID) for _, info in [*same, *reports])
    assert transactions == sorted(r.TransactionUID for r in requests), node.log()[-3000:]


def test_an_unreachable_requestor_is_retried_less_often_then_given_up(running_node) -> None:
    """Nobody listens at the requestor's address: the report is retried after 0.2, 0.4, … s (doubling),
    then given up at commitment_give_up_after, with one error line naming everything an operator needs."""
    port = free_port()
    node = _start(running_node, port, retry_interval=0.2, give_up_after=4.0)
    request = _request([("1.2.840.10008.5.1.4.1.1.2", generate_uid())])
    status, _ = _ask(node, request, wait=False)
    assert status.Status == 0
    transaction = request.TransactionUID
    assert wait_until(lambda: "given up" in node.log(), _WAIT), node.log()[-3000:]
    lines = [line for line in node.log().splitlines() if transaction in line]
    retries = [line.rsplit("retrying in ", 1)[1] for line in lines if "retrying in" in line]
    assert retries[:2] == ["0.2 s", "0.4 s"], lines  # the back-off (the last wait is cut at the give-up time)
    [given_up] = [line for line in lines if "given up" in line]
    assert f"storage commitment {transaction}: report to {MODALITY} at {LOOPBACK}:{port} given up after " in given_up
    assert f"and {len(retries) + 1} attempt(s)" in given_up and "last error: could not connect" in given_up
    assert "the modality must ask again ([storage] commitment_give_up_after = 4 s)" in given_up
    assert "ERROR" in given_up
    assert _pending_count(node) == 0 and admin_json(node.config_path, "commitments") == []


def test_operators_list_and_drop_waiting_reports(running_node, database_url) -> None:
    """``dcbnode-admin commitments`` next to a running node (SQLite or PostgreSQL): what waits, how old,
    how often tried and why it failed; ``--drop UID`` and ``--drop-all`` forget requests at once, and the
    node sends no report for them."""
    port = free_port()
    node = _start(running_node, port, retry_interval=0.2, database_url=database_url)
    requests = [_request([("1.2.840.10008.5.1.4.1.1.2", generate_uid())] * count) for count in (1, 2, 3)]
    for request in requests:
        assert _ask(node, request, wait=False)[0].Status == 0

    def tried() -> list[dict[str, Any]]:
        listed = admin_json(node.config_path, "commitments")
        return listed if len(listed) == 3 and all(item["attempts"] >= 1 for item in listed) else []

    assert wait_until(lambda: bool(tried()), _WAIT), node.log()[-3000:]
    listed = {item["transaction_uid"]: item for item in tried()}
    assert set(listed) == {r.TransactionUID for r in requests}
    first = listed[requests[0].TransactionUID]
    assert first["calling_ae_title"] == MODALITY
    assert [listed[r.TransactionUID]["instances"] for r in requests] == [1, 2, 3]
    assert "could not connect: Connection refused" in first["last_error"] and first["age_seconds"] >= 0
    assert {"received_at", "next_attempt_at", "being_sent_by"} <= set(first)
    shown = admin(node.config_path, "commitments").stdout
    assert all(r.TransactionUID in shown for r in requests) and "3 storage commitment report(s) waiting" in shown
    assert "last error" in shown.splitlines()[0] and "could not connect" in shown

    dropped = admin(node.config_path, "commitments", "--drop", requests[0].TransactionUID).stdout
    assert f"dropped {requests[0].TransactionUID} from {MODALITY} (1 instance(s)" in dropped
    assert "dropped 1 storage commitment request(s): their reports will not be sent" in dropped
    unknown = admin(node.config_path, "commitments", "--drop", requests[0].TransactionUID, check=2).stderr
    assert "no storage commitment request with Transaction UID" in unknown and "dcbnode-admin commitments" in unknown
    assert {item["transaction_uid"] for item in admin_json(node.config_path, "commitments")} == \
        {r.TransactionUID for r in requests[1:]}
    everything = admin_json(node.config_path, "commitments", "--drop-all")["dropped"]
    assert sorted(item["transaction_uid"] for item in everything) == sorted(r.TransactionUID for r in requests[1:])
    assert admin_json(node.config_path, "commitments") == []
    # The modality comes back: only a new request's report reaches it, none of the dropped ones.
    with _modality_scp(port) as (reports, arrived):
        fresh = _request([("1.2.840.10008.5.1.4.1.1.2", generate_uid())])
        assert _ask(node, fresh, wait=False)[0].Status == 0
        assert arrived.wait(_WAIT), node.log()[-3000:]
        assert wait_until(lambda: admin_json(node.config_path, "commitments") == [], _WAIT)
    assert [str(info.TransactionUID) for _, info in reports] == [fresh.TransactionUID]
