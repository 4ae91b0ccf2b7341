"""C-FIND over real sockets: pynetdicom and DCMTK ``findscu`` SCUs against the node's handler.

The node is ``python -m dcbnode.cli.node serve`` when that module exists, otherwise an in-process
pynetdicom AE with :func:`dcbnode.net.find_scp.handle_find` bound (the same handler the server registers).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import LOOPBACK, free_port, run_dcmtk

from dcbnode.archive import Archive
from dcbnode.config import Config, NodeConfig
from dcbnode.index.models import Patient, Study
from dcbnode.net.context import NodeContext
from dcbnode.net.find_scp import handle_find

AET = "DCBNODE"
CHARSET_DIR = Path(pydicom.__file__).parent / "data" / "charset_files"
BULK_STUDIES = 20000  #: studies of patient "MANY", inserted directly, for C-CANCEL mid-stream
HAVE_CLI = importlib.util.find_spec("dcbnode.cli.node") is not None


@dataclass
class Node:
    host: str
    port: int
    study: str
    series: list[str]


def _populate(data_dir: Path) -> tuple[str, list[str]]:
    archive = Archive(data_dir, f"sqlite:///{data_dir / 'index.sqlite'}")
    study, series = generate_uid(), [generate_uid() for _ in range(3)]
    for index, series_uid in enumerate(series):
        for number in range(1, 3):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.PatientID, ds.PatientName = "NET1", "Müller^Jürgen"
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber, ds.SeriesNumber = number, index + 1
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            archive.store(buffer.getvalue())
    with archive.index.session() as session:
        many = Patient(patient_id="MANY", issuer_of_patient_id="", patient_name="MANY^STUDIES",
                       patient_name_folded="many^studies")
        session.add(many)
        session.flush()
        session.add_all(Study(patient_pk=many.id, study_instance_uid=f"1.2.3.{i}", study_date="20200101")
                        for i in range(BULK_STUDIES))
    archive.close()
    return study, series


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node answering C-FIND on a loopback port."""
    root = tmp_path_factory.mktemp("findnode")
    data_dir = root / "data"
    study, series = _populate(data_dir)
    port = free_port()
    if HAVE_CLI:
        from conftest import start_node, stop_node

        running = start_node(root, data_dir=data_dir, port=port)
        yield Node(LOOPBACK, port, study, series)
        assert stop_node(running) == 0
        return
    archive = Archive(data_dir, f"sqlite:///{data_dir / 'index.sqlite'}")
    context = NodeContext(Config(node=NodeConfig(ae_title=AET)), archive)
    ae = AE(ae_title=AET)
    for sop_class in (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind):
        ae.add_supported_context(sop_class)
    server = ae.start_server((LOOPBACK, port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, handle_find, [context])])
    yield Node(LOOPBACK, port, study, series)
    server.shutdown()
    archive.close()


def _find(node: Node, model: object, extended: bytes | None = None,
          **keys: object) -> list[tuple[int, Dataset | None]]:
    """C-FIND from a stock pynetdicom SCU; ``extended``: its SOP Class Extended Negotiation proposal."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    ext_neg = []
    if extended is not None:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid, item.service_class_application_information = model, extended
        ext_neg.append(item)
    assoc = ae.associate(node.host, node.port, ae_title=AET, ext_neg=ext_neg)
    assert assoc.is_established
    if HAVE_CLI:  # the node's EVT_SOP_EXTENDED handler: byte 2 (combined date-time) only
        accepted = assoc.acceptor.sop_class_extended.get(str(model))
        assert accepted == (None if extended is None else bytes(int(i == 1 and b == 1) for i, b in enumerate(extended)))
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    try:
        return [(int(status.Status), identifier) for status, identifier in assoc.send_c_find(ds, model)]
    finally:
        assoc.release()


def test_each_level_over_pynetdicom(node: Node) -> None:
    [(status, patient), (final, _)] = _find(node, PatientRootQueryRetrieveInformationModelFind,
                                            QueryRetrieveLevel="PATIENT", PatientID="NET1", PatientName="",
                                            NumberOfPatientRelatedInstances="")
    assert (status, final) == (0xFF00, 0x0000)
    assert patient.PatientName == "Müller^Jürgen" and patient.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
    assert patient.NumberOfPatientRelatedInstances == 6
    studies = _find(node, StudyRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="STUDY",
                    PatientName="mül*", StudyInstanceUID="", ModalitiesInStudy="", RetrieveAETitle="")
    assert [s for s, _ in studies] == [0xFF00, 0x0000]
    assert (studies[0][1].StudyInstanceUID, studies[0][1].RetrieveAETitle) == (node.study, AET)
    images = _find(node, StudyRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="IMAGE",
                   StudyInstanceUID=node.study, SeriesInstanceUID=node.series[1], SOPInstanceUID="",
                   InstanceNumber="", Rows="")
    assert [(r.InstanceNumber, r.Rows) for _, r in images[:-1]] == [(1, 128), (2, 128)]


def test_series_query_one_response_per_series(node: Node) -> None:
    responses = _find(node, PatientRootQueryRetrieveInformationModelFind, QueryRetrieveLevel="SERIES",
                      PatientID="NET1", StudyInstanceUID=node.study, SeriesInstanceUID="", SeriesNumber="",
                      NumberOfSeriesRelatedInstances="")
    pending = [r for s, r in responses if s == 0xFF00]
    assert sorted(r.SeriesInstanceUID for r in pending) == sorted(node.series)
    assert all(r.NumberOfSeriesRelatedInstances == 2 for r in pending)
    assert responses[-1][0] == 0x0000


@pytest.mark.parametrize(("model", "keys"), [
    (PatientRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}),
    (StudyRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}),
    (StudyRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.*"}),
    (StudyRootQueryRetrieveInformationModelFind, {"StudyInstanceUID": ""}),
    (StudyRootQueryRetrieveInformationModelFind, {"QueryRetrieveLevel": "STUDY", "StudyDate": "yesterday"}),
])
def test_malformed_identifiers_get_a900(node: Node, model: object, keys: dict) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=AET)
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    [(status, identifier)] = list(assoc.send_c_find(ds, model))
    assoc.release()
    assert status.Status == 0xA900 and identifier is None
    assert status.ErrorComment


def test_cancel_mid_stream(node: Node) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=AET)
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.PatientID, ds.StudyInstanceUID = "STUDY", "MANY", ""
    statuses = []
    for status, _ in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
        statuses.append(int(status.Status))
        if len(statuses) == 1:
            assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelFind)
    assert assoc.is_established  # the association survives a cancel
    assoc.release()
    assert statuses[-1] == 0xFE00, (len(statuses), statuses[-3:])
    assert 1 <= statuses.count(0xFF00) < BULK_STUDIES


def _findscu(node: Node, root: str, tmp_path: Path, *keys: str) -> list[Dataset]:
    result = run_dcmtk("findscu", [root, "-aec", AET, "-X", "-od", str(tmp_path), "-k", *[
        part for key in keys for part in ("-k", key)][1:], node.host, str(node.port)], timeout=60)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(tmp_path.glob("rsp*.dcm"))]


def test_dcmtk_findscu_study_root_series(node: Node, tmp_path: Path) -> None:
    responses = _findscu(node, "-S", tmp_path, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={node.study}",
                         "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")
    assert sorted(r.SeriesInstanceUID for r in responses) == sorted(node.series)


def test_dcmtk_findscu_patient_root(node: Node, tmp_path: Path) -> None:
    responses = _findscu(node, "-P", tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=NET1",
                         "StudyInstanceUID", "PatientName", "StudyDate")
    assert [(r.StudyInstanceUID, r.PatientName) for r in responses] == [(node.study, "Müller^Jürgen")]
    refused = run_dcmtk("findscu", ["-v", "-P", "-aec", AET, "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                                    node.host, str(node.port)], timeout=60)
    output = (refused.stdout + refused.stderr).lower()
    assert "a900" in output or "doesnotmatchsopclass" in output, output


@pytest.mark.parametrize("extended, matches", [(None, 0), (b"\x00\x00", 0), (b"\x01\x01\x01", 1), (b"\x00\x01", 1)])
def test_combined_datetime_only_when_negotiated(node: Node, extended: bytes | None, matches: int) -> None:
    """PS3.4 C.2.2.2.5.2: StudyDate 20040118-20040119 with StudyTime 1200-0800 is one range, from the 18th at
    noon to the 19th at 08:00, only for a peer that negotiated combined date-time matching (byte 2); the
    study (20040119 07:27:30) matches then, and never when the two ranges are matched separately."""
    responses = _find(node, StudyRootQueryRetrieveInformationModelFind, extended, QueryRetrieveLevel="STUDY",
                      StudyInstanceUID=node.study, StudyDate="20040118-20040119", StudyTime="1200-0800")
    assert responses[-1][0] == 0x0000
    assert len(responses) - 1 == matches


def test_iso_2022_study_answered_in_its_own_set_over_the_network(running_node) -> None:
    """A Japanese (ISO 2022 IR 87) and a Korean (ISO 2022 IR 149) study from pydicom's charset_files, stored
    and queried over the network by stock pynetdicom SCUs: the responses declare the study's set and carry
    the name as ISO 2022 bytes (escape sequences), which decode to the name as stored."""
    from conftest import scu_store

    node = running_node()
    files = {"chrH31.dcm": ["", "ISO 2022 IR 87"], "chrI2.dcm": ["", "ISO 2022 IR 149"]}
    originals = {name: pydicom.dcmread(CHARSET_DIR / name) for name in files}
    for ds in originals.values():  # the files share UIDs with other test files: store fresh copies
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert [s.Status for s in scu_store(node, list(originals.values()))] == [0, 0]
    for name, charset in files.items():
        original = originals[name]
        found = _find(Node(node.host, node.port, "", []), StudyRootQueryRetrieveInformationModelFind,
                      QueryRetrieveLevel="STUDY", StudyInstanceUID=original.StudyInstanceUID, PatientName="")
        [(status, identifier)] = found[:-1]
        assert status == 0xFF00 and identifier.SpecificCharacterSet == charset
        raw = identifier.PatientName.original_string  # the bytes received
        assert b"\x1b$" in raw, raw  # ISO 2022 escape sequences: not UTF-8
        assert str(identifier.PatientName) == str(original.PatientName)
