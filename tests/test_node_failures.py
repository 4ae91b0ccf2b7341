"""What the node refuses: bad datasets (failure status, Error Comment, nothing stored), unknown AEs
(association rejected), duplicates per policy, an invalid configuration, and SIGHUP reloads."""

from __future__ import annotations

import copy
import signal
import socket
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import (
    REPO,
    indexed_count,
    read_back,
    rebuilt_part10,
    scu_store,
    stop_node,
    volumes_size,
    wait_until,
    write_config,
)
from peers import LOOPBACK, free_port
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from dcbnode.config import DUPLICATE_STATUS

TEST_FILES = Path(get_testdata_file("CT_small.dcm", download=False)).parent


def _ct(**changes: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _short_pixels() -> pydicom.Dataset:
    ds = _ct()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


BAD_DATASETS = {
    "missing series uid": (lambda: _ct(SeriesInstanceUID=None), 0xA900),
    "invalid uid": (lambda: _ct(StudyInstanceUID="1.2.abc"), 0xA900),
    "short pixel data": (_short_pixels, 0xA900),
}


@pytest.fixture
def node(running_node):
    return running_node()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_datasets_fail_and_store_nothing(node, tmp_path, monkeypatch):
    assert scu_store(node, [_ct()])[0].Status == 0  # one good instance, so the volume exists
    archive = read_back(node.data_dir)
    count, size = indexed_count(archive), volumes_size(node.data_dir)
    for name, (make, expected) in BAD_DATASETS.items():
        status = scu_store(node, [make()])[0]
        assert status.Status == expected, name
        assert 0 < len(status.ErrorComment) <= 64, name
    # AffectedSOPInstanceUID (from the file meta when sending a file unparsed) ≠ the dataset's UID
    mismatched = _ct()
    mismatched.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "mismatch.dcm"
    mismatched.save_as(path)  # not enforce_file_format: it would make the meta UID match again
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID != mismatched.SOPInstanceUID
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, str(mismatched.file_meta.TransferSyntaxUID))
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA900 and "differs" in status.ErrorComment

    assert indexed_count(archive) == count
    assert volumes_size(node.data_dir) == size
    archive.close()
    assert "status 0xA900" in node.log()
    # (A compressed frame no decoder reads is not refused but taken as sent: tests/test_taken_as_sent.py.)


def _associate(node, calling: str, called: str):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate(node.host, node.port, ae_title=called)


def test_unknown_called_and_calling_aet_rejected(running_node):
    node = running_node(access={"allowed_calling_aets": ["GOODSCU"]})
    assoc = _associate(node, "GOODSCU", "NOTUS")
    assert assoc.is_rejected
    assoc = _associate(node, "BADSCU", node.aet)
    assert assoc.is_rejected
    # A-ASSOCIATE-RJ reasons (PS3.8 9.3.4): 3 = calling AE title not recognised, 7 = called AE title
    # The node logs an association when its connection closes, which may be just after the peer saw the
    # rejection: wait for the lines rather than read the log once.
    expected = ("association rejected from BADSCU", "association rejected from GOODSCU")
    assert wait_until(lambda: all(line in node.log() for line in expected)), node.log()
    # Each line says which check failed and what the peer was sent.
    lines = {line.split("association rejected from ")[1][:7]: line for line in node.log().splitlines()
             if "association rejected from" in line}
    assert ("calling AE title 'BADSCU' is not in [access] allowed_calling_aets (A-ASSOCIATE-RJ result 1 "
            "rejected-permanent, source 1 service-user, reason 3 calling-AE-title-not-recognized)") in lines["BADSCU@"]
    assert "called AE title 'NOTUS' is not ours (DCBNODE)" in lines["GOODSCU"]
    assert "reason 7 called-AE-title-not-recognized" in lines["GOODSCU"]
    assoc = _associate(node, "GOODSCU", node.aet)
    assert assoc.is_established
    assoc.release()


def test_reject_reasons(running_node):
    """The rejection reason codes, read from the A-ASSOCIATE-RJ the peer received."""
    from pynetdicom import evt

    node = running_node(access={"allowed_calling_aets": ["GOODSCU"]})
    reasons = []

    def on_rejected(event):
        primitive = event.assoc.acceptor.primitive
        reasons.append((primitive.result_source, primitive.diagnostic))

    for calling, called in (("BADSCU", node.aet), ("GOODSCU", "NOTUS")):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.associate(node.host, node.port, ae_title=called, evt_handlers=[(evt.EVT_REJECTED, on_rejected)])
    assert reasons == [(1, 3), (1, 7)]


def test_association_limit_rejection_is_logged_with_its_reason(running_node):
    node = running_node(max_associations=1, acse_timeout=2)
    # The start-up port probe's connection holds the one slot until its thread gives up waiting for an
    # A-ASSOCIATE-RQ (acse_timeout): retry until the slot is ours.
    attempts = []
    assert wait_until(lambda: attempts.append(_associate(node, "FIRST", node.aet)) or attempts[-1].is_established,
                      timeout=20)
    held = attempts[-1]
    try:
        refused = _associate(node, "SECOND", node.aet)
        assert refused.is_rejected
        primitive = refused.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
    finally:
        held.release()
    assert wait_until(lambda: "association rejected from SECOND" in node.log()), node.log()
    line = next(line for line in node.log().splitlines() if "association rejected from SECOND" in line)
    assert "association limit reached (1 at once, node.max_associations)" in line, line
    assert ("result 2 rejected-transient, source 3 service-provider (presentation), reason 2 local-limit-exceeded"
            in line)


@pytest.mark.parametrize("policy", ["keep_first", "replace", "reject"])
def test_duplicate_policies(running_node, policy):
    node = running_node(duplicate_policy=policy)
    first = _ct(PatientName="First^Copy")
    second = copy.deepcopy(first)
    second.PatientName = "Second^Copy"
    assert scu_store(node, [first])[0].Status == 0
    status = scu_store(node, [second])[0]
    assert status.Status == DUPLICATE_STATUS[policy]
    if policy == "reject":
        assert status.ErrorComment
    archive = read_back(node.data_dir)
    kept = pydicom.dcmread(pydicom.filebase.DicomBytesIO(rebuilt_part10(archive, str(first.SOPInstanceUID))))
    assert str(kept.PatientName) == ("Second^Copy" if policy == "replace" else "First^Copy")
    assert indexed_count(archive) == 1
    archive.close()


def test_invalid_config_exits_2_before_binding(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "bad.toml", {"node": {"port": port, "data_dir": str(tmp_path / "d"),
                                                            "max_pdu_size": "big"}})
    result = subprocess.run([sys.executable, "-m", "dcbnode.cli.node", "serve", "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "node.max_pdu_size" in lines[0]
    assert not (tmp_path / "d").exists()  # nothing was created, let alone bound
    with socket.socket() as probe:
        assert probe.connect_ex((LOOPBACK, port)) != 0


def test_sighup_reloads_allowed_calling_aets(running_node):
    node = running_node(access={"allowed_calling_aets": ["FIRST"]})
    assert _associate(node, "SECOND", node.aet).is_rejected
    text = node.config_path.read_text().replace('["FIRST"]', '["FIRST", "SECOND"]')
    node.config_path.write_text(text)
    node.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP: reloaded" in node.log())
    assoc = _associate(node, "SECOND", node.aet)
    assert assoc.is_established
    assoc.release()
    # An invalid file is reported and the running configuration kept.
    node.config_path.write_text(text.replace('["FIRST", "SECOND"]', '"SECOND"'))
    node.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration not reloaded" in node.log())
    assert "access.allowed_calling_aets" in node.log()
    assoc = _associate(node, "SECOND", node.aet)
    assert assoc.is_established
    assoc.release()
    assert _associate(node, "THIRD", node.aet).is_rejected
    assert stop_node(node) == 0


@pytest.mark.parametrize("compression", ["deferred", "inline"])
def test_full_disk_answers_out_of_resources_and_keeps_what_was_acknowledged(running_node, small_filesystem,
                                                                           compression):
    data_dir = small_filesystem / "data"
    node = running_node(data_dir=data_dir, compression=compression, compression_delay=600.0)
    sent = [_ct() for _ in range(260)]  # 10 MB uncompressed, 4 MB compressed: more than the 3 MiB disk holds
    statuses = [int(status.Status) for status in scu_store(node, sent)]
    stored = [ds for ds, code in zip(sent, statuses, strict=True) if code == 0x0000]
    assert 0xA700 in statuses and stored, statuses
    assert set(statuses) <= {0x0000, 0xA700}, statuses
    assert "storage is full" in node.log()
    # Room again: the node stores the next one without a restart.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
    late = _ct()
    assert int(scu_store(node, [late])[0].Status) == 0x0000
    assert stop_node(node) == 0
    archive = read_back(data_dir)
    try:
        assert indexed_count(archive) == len(stored) + 1
        for ds in [*stored, late]:
            rebuilt = pydicom.dcmread(BytesIO(rebuilt_part10(archive, str(ds.SOPInstanceUID))))
            assert rebuilt.PixelData == ds.PixelData and rebuilt.SOPInstanceUID == ds.SOPInstanceUID
    finally:
        archive.close()


def test_unparseable_dataset_gets_a_comment_for_a_person(node, tmp_path, monkeypatch):
    """A data set pydicom cannot read (labelled Deflated, but not deflated: zlib fails) is refused with an
    Error Comment for a person; zlib's own message goes to the node's log only."""
    ds = _ct()
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, ds)  # Explicit VR Little Endian, the file's own syntax
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    meta = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta)
    path = tmp_path / "not-deflated.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue())
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes unparsed
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.DeflatedExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA900
    # e.g. "deflated dataset cannot be inflated", without zlib's "Error -3 while decompressing data: …"
    assert status.ErrorComment and "decompressing" not in status.ErrorComment and ":" not in status.ErrorComment
    assert wait_until(lambda: "decompressing data" in node.log()), node.log()[-3000:]
