"""C-MOVE and C-GET end to end: the node runs as a subprocess; what arrives is compared element by element
and pixel by pixel with the files originally stored."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    HTJ2K,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, stop_node, wait_until, write_config
from faithful import element_differences, pixels_equal
from peers import LOOPBACK, dcmtk_tool, free_port, run_dcmtk, run_getscu, storescp, wait_for_port

NODE_AET = "DCBNODE"
FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "examples_ybr_color.dcm"]
HTJ2K_FILES = FILES[:4]  # the JPEG baseline instance keeps its lossy codestream: no HTJ2K form
JPEG_FILE = "examples_ybr_color.dcm"
DESTINATIONS = ["STORESCP", "HTJ2KONLY", "IMPLICIT", "JPEGONLY", "SLOW", "ABORTER", "DOWN", "REJECTER", "NOCONTEXT"]
MANY = 30  # copies of CT_small with new UIDs, for cancel and abort


def _path(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} not available offline")
    return Path(found)


class Node:
    """The node under test, with the files it holds."""

    def __init__(self, port: int, ports: dict[str, int], process: subprocess.Popen[bytes], log: Path,
                 originals: dict[str, Dataset], many_study: str) -> None:
        self.port, self.ports, self.process, self.log_path = port, ports, process, log
        self.originals, self.many_study = originals, many_study

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _store(port: int, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="LOADER")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with the test files and MANY CT copies stored; its peers are on ports reserved here."""
    tmp = tmp_path_factory.mktemp("retrieve")
    port = free_port()
    ports = {aet: free_port() for aet in DESTINATIONS}
    tables: dict[str, dict[str, Any]] = {"node": {"ae_title": NODE_AET, "bind": LOOPBACK, "port": port,
                                                  "data_dir": str(tmp / "data")}}
    for aet, peer_port in ports.items():
        tables[f"peers.{aet}"] = {"host": LOOPBACK, "port": peer_port}
    config = write_config(tmp / "node.toml", tables)
    log = tmp / "node.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "dcbnode.cli.node", "serve", "--config", str(config)],
                                   cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(LOOPBACK, port, 30.0, process)
        originals = {}
        for name in FILES:
            ds = pydicom.dcmread(_path(name))
            originals[name] = ds
        many_study, many_series = generate_uid(), generate_uid()
        copies = []
        for index in range(MANY):
            ds = pydicom.dcmread(_path("CT_small.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = many_study, many_series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = index + 1
            copies.append(ds)
        _store(port, [*originals.values(), *copies])
        yield Node(port, ports, process, log, originals, many_study)
    finally:
        code = stop_node(_Stoppable(process, log))
        assert code == 0, log.read_text(errors="replace")[-3000:]


class _Stoppable:
    """What conftest.stop_node needs of a node."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process, self.log_path = process, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def pynetdicom_scp(aet: str, port: int, syntaxes: list[str],
                   on_store: Callable[[Any, int], int] | None = None) -> Iterator[list[Dataset]]:
    """A pynetdicom Storage SCP collecting what it receives; ``on_store(event, n)`` may act on the n-th."""
    received: list[Dataset] = []
    ae = AE(ae_title=aet)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)

    def handle(event: Any) -> int:
        received.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(event.encoded_dataset())))
        return on_store(event, len(received)) if on_store else 0x0000

    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield received
    finally:
        server.shutdown()


def _uids(names: list[str], node: Node) -> dict[str, str]:
    return {node.originals[n].SOPInstanceUID: n for n in names}


def _image_identifier(uids: list[str]) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = uids
    return identifier


def _study_identifier(study: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return identifier


def _move(node: Node, destination: str, identifier: Dataset,
          cancel_after: int | None = None) -> list[Dataset]:
    """C-MOVE with pynetdicom; returns every response status dataset."""
    ae = AE(ae_title="MOVESCU")
    ae.dimse_timeout = 20  # the node never waits for a destination that has gone (see the abort test)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AET)
    assert assoc.is_established
    responses = []
    try:
        for status, _ in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove,
                                           msg_id=7):
            responses.append(status)
            if cancel_after is not None and len(responses) == cancel_after:
                context_id = next(cx.context_id for cx in assoc.accepted_contexts
                                  if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelMove)
                assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    return responses


def _check_faithful(received: list[Dataset], node: Node, names: list[str], syntax: str | None = None,
                    ignore: frozenset[int] | set[int] = frozenset()) -> None:
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    assert sorted(by_uid) == sorted(node.originals[n].SOPInstanceUID for n in names)
    for name in names:
        original = node.originals[name]
        got = by_uid[original.SOPInstanceUID]
        if syntax is not None:
            assert got.file_meta.TransferSyntaxUID == syntax, name
        view = _network_view(original)
        for tag in ignore:
            view.pop(tag, None)
        assert element_differences(view, got) == [], name
        assert pixels_equal(original, got), name


def _network_view(original: Dataset) -> Dataset:
    """The original as a C-STORE carries it: PS3.7 sends no file meta (the receiver writes its own)."""
    view = Dataset(dict(original.items()))  # a new dict (of the raw elements): pops stay here
    view.file_meta = FileMetaDataset()
    return view


# --------------------------------------------------------------------------- C-GET


def _get(node: Node, identifier: Dataset, syntaxes: list[str], model: str = StudyRootQueryRetrieveInformationModelGet,
         *, max_pdu: int | None = None, handlers: list[tuple[Any, Callable[[Any], Any]]] | None = None,
         raw: list[bytes] | None = None, dimse_timeout: float = 30) -> tuple[list[Dataset], list[Dataset]]:
    """C-GET with pynetdicom proposing ``syntaxes`` with the SCP role; returns (responses, received).

    ``max_pdu``: the maximum PDU length the SCU advertises (pynetdicom's default if None); ``handlers``:
    more event handlers for the association; ``raw`` collects each received data set's bytes.
    """
    received: list[Dataset] = []

    def handle(event: Any) -> int:
        if raw is not None:
            raw.append(event.encoded_dataset())
        received.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(event.encoded_dataset())))
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.dimse_timeout = dimse_timeout
    ae.add_requested_context(model)
    classes = sorted({ds.SOPClassUID for ds in node.originals.values()})
    for sop_class in classes:
        for syntax in syntaxes:  # one context per syntax: the acceptor keeps one syntax per context
            ae.add_requested_context(sop_class, syntax)
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
    assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AET, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, handle), *(handlers or [])],
                         **({} if max_pdu is None else {"max_pdu": max_pdu}))
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, model)]
    finally:
        assoc.release()
    return responses, received


def test_get_htj2k_bit_exact(node: Node) -> None:
    started = time.perf_counter()
    uids = list(_uids(HTJ2K_FILES, node))
    responses, received = _get(node, _image_identifier(uids), [HTJ2KLossless, HTJ2K])
    assert responses[-1].Status == 0x0000, responses[-1]
    assert responses[-1].NumberOfCompletedSuboperations == len(uids)
    assert [r.Status for r in responses[:-1]] == [0xFF00] * len(uids)
    assert [r.NumberOfRemainingSuboperations for r in responses[:-1]] == list(range(len(uids) - 1, -1, -1))
    _check_faithful(received, node, HTJ2K_FILES, HTJ2KLossless)  # decoded by pylibjpeg-openjpeg
    # pydicom has no GDCM plugin for HTJ2K (only pylibjpeg), so the GDCM cross-check is skipped here.
    assert time.perf_counter() - started < 30


def test_get_native_prefers_explicit_and_keeps_jpeg(node: Node) -> None:
    responses, received = _get(node, _image_identifier(list(_uids(FILES, node))),
                               [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit])
    assert responses[-1].Status == 0x0000
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    jpeg = by_uid[node.originals[JPEG_FILE].SOPInstanceUID]
    assert jpeg.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert jpeg.PixelData == node.originals[JPEG_FILE].PixelData  # the lossy codestream, byte for byte
    _check_faithful([d for d in received if d is not jpeg], node, HTJ2K_FILES, ExplicitVRLittleEndian)


def test_get_patient_root_and_bad_identifiers(node: Node) -> None:
    ct = node.originals["CT_small.dcm"]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = ct.PatientID
    responses, received = _get(node, identifier, [ExplicitVRLittleEndian],
                               PatientRootQueryRetrieveInformationModelGet)
    assert responses[-1].Status in (0x0000, 0xB000)
    assert ct.SOPInstanceUID in {ds.SOPInstanceUID for ds in received}
    no_level = _study_identifier(ct.StudyInstanceUID)
    del no_level.QueryRetrieveLevel
    for bad in (no_level, _study_identifier("not-a-uid")):
        responses, received = _get(node, bad, [ExplicitVRLittleEndian])
        assert responses[-1].Status == 0xA900 and responses[-1].ErrorComment, responses[-1]
        assert not received
    patient_level = Dataset()
    patient_level.QueryRetrieveLevel = "PATIENT"
    patient_level.PatientID = ct.PatientID
    responses, _ = _get(node, patient_level, [ExplicitVRLittleEndian])  # PATIENT is not in Study Root
    assert responses[-1].Status == 0xA900


def _assert_still_serving(node: Node) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AET)
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert node.process.poll() is None


def _pdata_pdus(pdus: list[Any]) -> Callable[[Any], None]:
    """EVT_PDU_RECV handler collecting the P-DATA-TF PDUs."""

    def collect(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            pdus.append(event.pdu)

    return collect


@pytest.mark.parametrize("syntax", [HTJ2KLossless, ExplicitVRLittleEndian])
def test_get_fragments_to_the_receivers_max_pdu(node: Node, syntax: str) -> None:
    """dcbnode lays out the P-DATA-TF PDUs itself (dcbnode.net.wire): every PDU within the maximum length
    the receiver advertised, one PDV each, command then data set, last fragments flagged; the data sets
    reassemble to the same bytes whatever the PDU size, and are faithful to the originals."""
    uids = list(_uids(HTJ2K_FILES, node))
    by_size: dict[int, list[bytes]] = {}
    for max_pdu in (4096, 16384, 0):
        pdus: list[Any] = []
        raw: list[bytes] = []
        responses, received = _get(node, _image_identifier(uids), [syntax], max_pdu=max_pdu,
                                   handlers=[(evt.EVT_PDU_RECV, _pdata_pdus(pdus))], raw=raw)
        assert responses[-1].Status == 0x0000 and len(received) == len(uids), responses[-1]
        _check_faithful(received, node, HTJ2K_FILES, syntax)
        by_size[max_pdu] = sorted(raw)
        headers = []
        for pdu in pdus:
            assert len(pdu.presentation_data_value_items) == 1
            item = pdu.presentation_data_value_items[0]
            assert max_pdu == 0 or len(item.presentation_data_value) + 4 <= max_pdu
            headers.append(item.presentation_data_value[0])
        # per message: command fragments (bit 0 set) ending with the last one (0x03), then any data set
        # fragments ending with 0x02 (C-STOREs have one, the C-GET responses none)
        flags = "".join({1: "c", 3: "C", 0: "d", 2: "D"}[h] for h in headers)
        assert re.fullmatch(r"(c*C(d*D)?)+", flags), flags
        assert flags.count("C") == 2 * len(uids) + 1 and flags.count("D") == len(uids), flags
        if max_pdu == 4096:
            assert flags.count("d") >= len(uids)  # every instance needs more than one 4 KiB PDU
        elif max_pdu == 0:
            assert len(pdus) == 3 * len(uids) + 1  # one PDU per command set and per data set
    assert by_size[4096] == by_size[16384] == by_size[0]
    # the per-operation log line (dcbnode.net.associations, from EVT_DIMSE_SENT) still sees every response
    done = f"C-GET from GETSCU: status 0x0000, completed {len(uids)}, failed 0, warning 0"
    assert wait_until(lambda: node.log().count(done) >= 3, 10), node.log()[-3000:]


def test_get_receiver_aborts_mid_message(node: Node) -> None:
    """A receiver that aborts while a C-STORE's PDUs are still arriving: the node stops the C-GET without
    waiting out a timeout, logs the abort, and keeps serving."""
    data_pdus = 0

    def abort_mid_message(event: Any) -> None:
        nonlocal data_pdus
        if not isinstance(event.pdu, P_DATA_TF):
            return
        if not event.pdu.presentation_data_value_items[0].presentation_data_value[0] & 1:  # a data set fragment
            data_pdus += 1
            if data_pdus == 3:  # the first instance spans 8 data PDUs at 4096 bytes
                threading.Thread(target=event.assoc.abort).start()

    log_before = len(node.log())
    _, received = _get(node, _study_identifier(node.many_study), [ExplicitVRLittleEndian], max_pdu=4096,
                       handlers=[(evt.EVT_PDU_RECV, abort_mid_message)], dimse_timeout=2)  # ours: not woken
    assert not received and data_pdus >= 3
    _assert_still_serving(node)
    ended = re.compile(r"association (aborted|dropped) from GETSCU@\S+ \(called \w+\) after (\d+\.\d+) s")
    assert wait_until(lambda: ended.search(node.log()[log_before:]) is not None, 10), node.log()[-3000:]
    assert float(ended.search(node.log()[log_before:])[2]) < 3  # the node did not wait out a timeout


def test_get_dcmtk_getscu(node: Node, tmp_path: Path) -> None:
    out = tmp_path / "got"
    out.mkdir()
    uids = _uids(HTJ2K_FILES, node)
    result = run_getscu(LOOPBACK, node.port, NODE_AET, out,
                        {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "\\".join(uids)})
    assert result.returncode == 0, result.stderr
    _check_faithful([pydicom.dcmread(p) for p in out.iterdir()], node, HTJ2K_FILES)


# --------------------------------------------------------------------------- C-MOVE


def test_move_dcmtk_movescu_to_storescp(node: Node, tmp_path: Path) -> None:
    dcmtk_tool("movescu")
    uids = _uids(FILES, node)
    with storescp(tmp_path / "in", aet="STORESCP", port=node.ports["STORESCP"]) as peer:
        result = run_dcmtk("movescu", ["-S", "-aet", "MOVESCU", "-aec", NODE_AET, "-aem", "STORESCP",
                                       "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID=" + "\\".join(uids),
                                       LOOPBACK, str(node.port)])
        assert result.returncode == 0, result.stdout + result.stderr
        received = [pydicom.dcmread(p) for p in peer.received()]
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    assert by_uid[node.originals[JPEG_FILE].SOPInstanceUID].file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    native = [d for d in received if d.SOPInstanceUID != node.originals[JPEG_FILE].SOPInstanceUID]
    # storescp writes files without the Data Set Trailing Padding (FFFC,FFFC) it received.
    _check_faithful(native, node, HTJ2K_FILES, ExplicitVRLittleEndian, ignore={0xFFFCFFFC})


def test_move_htj2k_only_destination(node: Node) -> None:
    with pynetdicom_scp("HTJ2KONLY", node.ports["HTJ2KONLY"], [HTJ2KLossless, HTJ2K]) as received:
        responses = _move(node, "HTJ2KONLY", _image_identifier(list(_uids(FILES, node))))
    final = responses[-1]
    # The JPEG baseline instance has no HTJ2K form: it fails, the others arrive.
    assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 1
    assert final.NumberOfCompletedSuboperations == len(HTJ2K_FILES)
    _check_faithful(received, node, HTJ2K_FILES, HTJ2KLossless)


def test_move_implicit_only_destination(node: Node) -> None:
    with pynetdicom_scp("IMPLICIT", node.ports["IMPLICIT"], [ImplicitVRLittleEndian]) as received:
        responses = _move(node, "IMPLICIT", _image_identifier(list(_uids(HTJ2K_FILES, node))))
    assert responses[-1].Status == 0x0000
    _check_faithful(received, node, HTJ2K_FILES, ImplicitVRLittleEndian)


def test_move_jpeg_only_destination_gets_original_codestream(node: Node) -> None:
    original = node.originals[JPEG_FILE]
    with pynetdicom_scp("JPEGONLY", node.ports["JPEGONLY"], [JPEGBaseline8Bit]) as received:
        responses = _move(node, "JPEGONLY", _image_identifier([original.SOPInstanceUID]))
    assert responses[-1].Status == 0x0000
    assert len(received) == 1 and received[0].PixelData == original.PixelData
    assert element_differences(_network_view(original), received[0]) == []


def test_move_unknown_destination(node: Node) -> None:
    responses = _move(node, "NOBODY", _image_identifier(list(_uids(["CT_small.dcm"], node))))
    assert [r.Status for r in responses] == [0xA801]


def _unreachable_line(node: Node, destination: str) -> str:
    """The node's one line about a destination it could not reach."""
    marker = f"C-MOVE destination {destination}@{LOOPBACK}:{node.ports[destination]} could not be reached: "
    assert wait_until(lambda: marker in node.log()), node.log()[-3000:]
    return next(line for line in node.log().splitlines() if marker in line)


def test_move_to_a_configured_destination_that_is_down(node: Node) -> None:
    """Not A801 (the destination is known): C801 and an Error Comment naming the peer and the reason."""
    dcmtk_tool("movescu")
    result = run_dcmtk("movescu", ["-d", "-S", "-aet", "MOVESCU", "-aec", NODE_AET, "-aem", "DOWN",
                                   "-k", "QueryRetrieveLevel=IMAGE",
                                   "-k", "SOPInstanceUID=" + node.originals["CT_small.dcm"].SOPInstanceUID,
                                   LOOPBACK, str(node.port)])
    output = result.stdout + result.stderr
    assert "DIMSE Status                  : 0xc801: Failed: Unable to process" in output, output
    assert f"[DOWN@{LOOPBACK}:{node.ports['DOWN']} could not connect: Connection refused]" in output, output
    assert "answering 0xC801" in _unreachable_line(node, "DOWN")


def test_move_to_a_destination_that_rejects_the_association(node: Node) -> None:
    ae = AE(ae_title="SOMEONE")  # not the title the node calls: rejected with reason 7
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server((LOOPBACK, node.ports["REJECTER"]), block=False)
    try:
        responses = _move(node, "REJECTER", _image_identifier([node.originals["CT_small.dcm"].SOPInstanceUID]))
    finally:
        server.shutdown()
    assert [r.Status for r in responses] == [0xC801]
    # 65 characters with the port: the peer and the reason fit without it
    assert responses[0].ErrorComment == f"REJECTER@{LOOPBACK} rejected: called-AE-title-not-recognized"
    assert "reason 7 called-AE-title-not-recognized" in _unreachable_line(node, "REJECTER")


def test_move_to_a_destination_that_accepts_no_context(node: Node) -> None:
    with pynetdicom_scp("NOCONTEXT", node.ports["NOCONTEXT"], [JPEGBaseline8Bit]):  # never what CT_small has
        responses = _move(node, "NOCONTEXT", _image_identifier([node.originals["CT_small.dcm"].SOPInstanceUID]))
    assert [r.Status for r in responses] == [0xC801]
    comment = f"NOCONTEXT@{LOOPBACK}:{node.ports['NOCONTEXT']} accepted no presentation context"
    assert responses[0].ErrorComment == comment
    assert "accepted none of the" in _unreachable_line(node, "NOCONTEXT")
    _assert_still_serving(node)


def test_move_cancel(node: Node) -> None:
    def slow(event: Any, count: int) -> int:
        time.sleep(0.1)
        return 0x0000

    with pynetdicom_scp("SLOW", node.ports["SLOW"], [ExplicitVRLittleEndian], slow) as received:
        started = time.perf_counter()
        responses = _move(node, "SLOW", _study_identifier(node.many_study), cancel_after=2)
        elapsed = time.perf_counter() - started
    final = responses[-1]
    assert final.Status == 0xFE00, final
    assert final.NumberOfRemainingSuboperations > 0
    assert len(received) < MANY and elapsed < MANY * 0.1


def test_move_destination_aborts_midway(node: Node) -> None:
    def abort_after_five(event: Any, count: int) -> int:
        if count == 5:
            threading.Thread(target=event.assoc.abort).start()
        return 0x0000

    with pynetdicom_scp("ABORTER", node.ports["ABORTER"], [ExplicitVRLittleEndian], abort_after_five):
        started = time.perf_counter()
        responses = _move(node, "ABORTER", _study_identifier(node.many_study))
        elapsed = time.perf_counter() - started
    assert elapsed < 5, f"C-MOVE took {elapsed:.1f} s after the destination aborted"
    final = responses[-1]
    assert final.Status in (0xB000, 0xA702), final
    assert final.NumberOfFailedSuboperations >= MANY - 5
    assert final.NumberOfCompletedSuboperations + final.NumberOfFailedSuboperations == MANY
    assert len(final.FailedSOPInstanceUIDList) == final.NumberOfFailedSuboperations \
        if "FailedSOPInstanceUIDList" in final else True
    _assert_still_serving(node)



# --------------------------------------------------------------------------- unit: sub-association contexts


def test_storage_contexts_trimmed_to_128_keeping_explicit() -> None:
    from dcbnode.archive.retrieve import RetrieveMatch
    from dcbnode.net.transfer import MAX_CONTEXTS, storage_contexts

    classes = [f"1.2.840.10008.5.1.4.1.1.{n}" for n in range(1, 41)]  # 40 classes × 4–5 syntaxes > 128
    matches = [RetrieveMatch(generate_uid(), c, JPEGBaseline8Bit if i % 2 else ExplicitVRLittleEndian)
               for i, c in enumerate(classes)]
    contexts = storage_contexts(matches)
    assert len(contexts) == MAX_CONTEXTS
    pairs = [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in contexts]
    assert len(set(pairs)) == len(pairs)
    assert {c for c, s in pairs if s == ExplicitVRLittleEndian} == set(classes)  # every class keeps Explicit
    assert {c for c, s in pairs if s == HTJ2KLossless} == set(classes)
    assert not any(s == HTJ2K for _, s in pairs)  # the least useful round is the one dropped
