"""Hostile identifiers: malformed UIDs in C-STORE/C-FIND/C-MOVE/C-GET get clear failure statuses and never
reach a path; C-FIND keys with SQL and LIKE metacharacters match literally (SQLite and PostgreSQL); huge
identifiers are refused before they are decoded."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from conftest import NODE_AET, indexed_count, read_back, scu_store, wait_until
from peers import LOOPBACK, send_raw_request
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

HOSTILE_UIDS = ["1.2.3/4", "1.2.3/../../../../tmp/x", "..", "1.2\x003", "1." + "2" * 70, "1.2.abc", "1.2.3.",
                "1..2", "/etc/passwd"]
REFUSED = {0xA900, 0xC000}  # PS3.4: "does not match SOP class" / "unable to process" failures


def _ct(**uids: str) -> pydicom.Dataset:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (generate_uid() for _ in range(3))
    for keyword, value in uids.items():
        setattr(dataset, keyword, value)
    return dataset


def _association(node, *contexts):
    ae = AE(ae_title="HOSTILE")
    for context in contexts:
        ae.add_requested_context(*context)
    assoc = ae.associate(node.host, node.port, ae_title=NODE_AET)
    assert assoc.is_established
    return assoc


def _store_raw(assoc, dataset: pydicom.Dataset, instance_uid: str) -> int | None:
    """A C-STORE whose request and data set carry ``instance_uid`` as the SOP Instance UID, unchecked; the
    status, ``None`` when the node aborted the association."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request._affected_sop_instance_uid = instance_uid
    request.Priority = 2
    dataset.SOPInstanceUID = instance_uid
    request.DataSet = BytesIO(encode(dataset, False, True))
    responses = send_raw_request(assoc, request)
    return None if responses is None else int(responses[-1].Status)


def _files(node) -> set[str]:
    return {str(p.relative_to(node.data_dir)) for p in node.data_dir.rglob("*") if p.is_file()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_c_store_with_hostile_uids_is_refused_and_never_reaches_a_path(running_node, tmp_path):
    node = running_node()
    assert [s.Status for s in scu_store(node, [_ct()])] == [0]
    before = _files(node)
    storage = (CTImageStorage, ExplicitVRLittleEndian)
    assoc = _association(node, storage)
    try:
        for uid in HOSTILE_UIDS:
            if len(uid) <= 64:  # as the SOP Instance UID, in the request and the data set
                assert _store_raw(assoc, _ct(), uid) in REFUSED, repr(uid)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
                status = _store_raw(assoc, _ct(**{keyword: uid}), generate_uid())
                assert status in REFUSED, (keyword, repr(uid))
    finally:
        assoc.release()
    # A command set whose Affected SOP Instance UID breaks the UI VR (over 64 characters) is not a valid
    # DIMSE message: pynetdicom, under the node, aborts the association (PS3.8 invalid PDU parameter).
    assoc = _association(node, storage)
    assert _store_raw(assoc, _ct(), HOSTILE_UIDS[4]) is None
    assert wait_until(lambda: assoc.is_aborted, 10)
    assert not list(tmp_path.glob("x")) and not (node.data_dir.parent / "x").exists()
    archive = read_back(node.data_dir)
    try:
        assert indexed_count(archive) == 1
    finally:
        archive.close()
    # Nothing but the one volume and its index changed: no file named after a UID.
    assert {f for f in _files(node) - before if not f.startswith("volumes/") and "index.sqlite" not in f} == set()


def _identifier(**keys: object) -> BytesIO:
    identifier = pydicom.Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return BytesIO(encode(identifier, True, True))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_query_and_retrieve_with_hostile_uids_get_failure_statuses(running_node):
    node = running_node(tables={"peers.ELSEWHERE": {"host": LOOPBACK, "port": 1}})
    find, move, get = (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                       StudyRootQueryRetrieveInformationModelGet)
    assoc = _association(node, (find,), (move,), (get,))
    try:
        for uid in HOSTILE_UIDS:
            for primitive_class, model in ((C_FIND, find), (C_MOVE, move), (C_GET, get)):
                request = primitive_class()
                request.MessageID = 3
                request.AffectedSOPClassUID = model
                if primitive_class is C_MOVE:
                    request.MoveDestination = "ELSEWHERE"
                request.Identifier = _identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=generate_uid(),
                                                 SeriesInstanceUID=generate_uid(), SOPInstanceUID=uid)
                responses = send_raw_request(assoc, request)
                assert responses is not None, "the node aborted"
                assert len(responses) == 1 and responses[0].Status in REFUSED, (model, repr(uid), responses[-1])
    finally:
        assoc.release()


METACHARACTER_IDS = ["100%", "1000", "A_C", "ABC", "O'BRIEN", "OXBRIEN", "X!Y", "X!!Y", "XY", "QUOTE'';--"]


def _find_ids(assoc, patient_id: str, name: str = "") -> set[str]:
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = patient_id
    identifier.PatientName = name
    identifier.StudyInstanceUID = ""
    found = set()
    for status, result in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        assert status.Status in (0x0000, 0xFF00, 0xFF01), hex(status.Status)
        if result is not None:
            found.add(str(result.PatientID))
    return found


def test_c_find_metacharacters_match_literally(running_node, database_url):
    node = running_node(database_url=database_url)
    datasets = [_ct(PatientID=value, PatientName=value) for value in METACHARACTER_IDS]
    assert [s.Status for s in scu_store(node, datasets)] == [0] * len(datasets)
    assoc = _association(node, (StudyRootQueryRetrieveInformationModelFind,))
    try:
        assert _find_ids(assoc, "100%") == {"100%"}
        assert _find_ids(assoc, "*%") == {"100%"}
        assert _find_ids(assoc, "A_C") == {"A_C"}
        assert _find_ids(assoc, "A_*") == {"A_C"}
        assert _find_ids(assoc, "O'BRIEN") == {"O'BRIEN"}
        assert _find_ids(assoc, "X!Y") == {"X!Y"}
        assert _find_ids(assoc, "X!*") == {"X!Y", "X!!Y"}
        assert _find_ids(assoc, "QUOTE'';--") == {"QUOTE'';--"}
        assert _find_ids(assoc, "ABC\\A_C") == {"ABC", "A_C"}  # backslash separates values: a list
        assert _find_ids(assoc, "", name="*'*") == {"O'BRIEN", "QUOTE'';--"}
        assert _find_ids(assoc, "", name="*%*") == {"100%"}
        assert _find_ids(assoc, "", name="A_C") == {"A_C"}
        assert len(_find_ids(assoc, "*")) == len(METACHARACTER_IDS)
    finally:
        assoc.release()


def test_huge_identifiers_are_refused(running_node):
    node = running_node()
    find, get = StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet
    assoc = _association(node, (find,), (get,))
    try:
        request = C_FIND()
        request.MessageID = 5
        request.AffectedSOPClassUID = find
        request.Identifier = _identifier(QueryRetrieveLevel="STUDY", PatientName="A" * 200_000)
        responses = send_raw_request(assoc, request)
        assert responses is not None and [r.Status for r in responses] == [0xC000]
        assert responses[0].ErrorComment.startswith("Identifier too large")
        request = C_GET()
        request.MessageID = 6
        request.AffectedSOPClassUID = get
        uids = "\\".join(generate_uid() for _ in range(20_000))  # 1.3 MB of UIDs
        request.Identifier = _identifier(QueryRetrieveLevel="IMAGE", SOPInstanceUID=uids)
        responses = send_raw_request(assoc, request)
        assert responses is not None and [r.Status for r in responses] == [0xC000]
        # The association goes on.
        request.MessageID = 7
        request.Identifier = _identifier(QueryRetrieveLevel="IMAGE", SOPInstanceUID=generate_uid())
        assert send_raw_request(assoc, request) is not None
    finally:
        assoc.release()
