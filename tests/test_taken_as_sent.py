"""Issue 17's pixel promises end to end, over real associations with a stock pynetdicom peer:

* compressed input no installed decoder reads is stored as received (Success, a warning in the log) and
  served in its own syntax byte for byte; a peer that accepts only native syntaxes gets a failed
  sub-operation for it while the rest of the retrieve goes on;
* a peer that proposes only the syntax an instance was sent in gets it in that syntax: the dataset bytes
  that were sent (kept codestreams, Big Endian), or a verified lossless re-encoding (JPEG-LS input, which
  is stored as HTJ2K);
* the negotiation preference (``[retrieve] syntax_preference``) decides among several accepted syntaxes.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    HTJ2K,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from dcbnode.config import DEFAULT_SYNTAX_PREFERENCE
from dcbnode.net.transfer import preferred_order

UNDECODABLE = "JPEG2000-embedded-sequence-delimiter.dcm"
JPEG_LS = "MR_small_jpeg_ls_lossless.dcm"
BIG_ENDIAN = "SC_rgb_expb.dcm"
JPEG_12_BIT = "JPEG-lossy.dcm"


def _file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing from pydicom's test data"
    return Path(path)


def _dataset_bytes(part10: bytes) -> bytes:
    """The bytes after the file meta group (always Explicit VR Little Endian)."""
    position = 132
    while part10[position : position + 2] == b"\x02\x00":
        vr = part10[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            position += 12 + int.from_bytes(part10[position + 8 : position + 12], "little")
        else:
            position += 8 + int.from_bytes(part10[position + 6 : position + 8], "little")
    return part10[position:]


@contextlib.contextmanager
def _sending_file_bytes() -> Iterator[None]:
    """pynetdicom sends a file's own dataset bytes (no decode, no re-encode), for this block only."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def _send(node, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    assert assoc.is_established
    try:
        with _sending_file_bytes():
            return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def _get(node, study_uid: str, contexts: dict[str, list[str]]) -> tuple[dict[str, tuple[str, bytes]], object]:
    """C-GET a study, proposing exactly ``contexts`` (SOP class → syntaxes) for the C-STOREs back; returns
    what arrived (SOP Instance UID → (syntax, dataset bytes as received)) and the final status."""
    received: dict[str, tuple[str, bytes]] = {}
    lock = threading.Lock()

    def on_store(event):
        data = event.encoded_dataset(include_meta=False)
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            received[uid] = (str(event.context.transfer_syntax), bytes(data))
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class, syntaxes in contexts.items():
        for syntax in syntaxes:  # one context per syntax: the node chooses per instance among them
            ae.add_requested_context(sop_class, [syntax])
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    final = None
    try:
        for status, answer in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and status.Status not in (0xFF00, 0xFF01):
                final = (status, answer)
    finally:
        assoc.release()
    return received, final


@pytest.fixture
def node(running_node):
    return running_node(compression_delay=1)


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_undecodable_input_is_taken_and_served_as_sent(node, tmp_path: Path) -> None:
    original = _file(UNDECODABLE)
    # A native CT in the same study: a retrieve that cannot carry one instance goes on with the others.
    ct = pydicom.dcmread(_file("CT_small.dcm"))
    ct.StudyInstanceUID = _study(original)
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct_path = tmp_path / "ct.dcm"
    ct.save_as(ct_path, enforce_file_format=True)
    assert _send(node, [original, ct_path]) == [0x0000, 0x0000]
    assert "stored as received, served in JPEG 2000" in node.log()

    header = pydicom.dcmread(original, stop_before_pixels=True)
    sop_class, syntax = str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)
    received, _ = _get(node, _study(original), {sop_class: [syntax], str(ct.SOPClassUID): [ExplicitVRLittleEndian]})
    assert received[str(header.SOPInstanceUID)] == (syntax, _dataset_bytes(original.read_bytes()))

    received, (status, answer) = _get(node, _study(original), {sop_class: [ExplicitVRLittleEndian,
                                                                            ImplicitVRLittleEndian],
                                                                str(ct.SOPClassUID): [ExplicitVRLittleEndian]})
    assert list(received) == [str(ct.SOPInstanceUID)]
    assert status.Status == 0xB000 and status.NumberOfFailedSuboperations == 1
    assert str(header.SOPInstanceUID) in answer.FailedSOPInstanceUIDList
    assert "pixel data kept as received in JPEG 2000" in node.log()


def test_each_instance_comes_back_in_the_syntax_it_was_sent_in(node) -> None:
    paths = [_file(name) for name in (BIG_ENDIAN, JPEG_LS, JPEG_12_BIT)]
    assert _send(node, paths) == [0x0000] * 3
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        syntax = str(header.file_meta.TransferSyntaxUID)
        received, _ = _get(node, str(header.StudyInstanceUID), {str(header.SOPClassUID): [syntax]})
        got_syntax, data = received[str(header.SOPInstanceUID)]
        assert got_syntax == syntax
        if syntax == JPEGLSLossless:  # stored as HTJ2K, encoded again: the same pixels, every other byte kept
            rebuilt = _as_dataset(data, syntax)
            assert np.array_equal(rebuilt.pixel_array, pydicom.dcmread(path).pixel_array)
        else:
            assert data == _dataset_bytes(path.read_bytes()), path.name


def _as_dataset(data: bytes, syntax: str) -> pydicom.Dataset:
    from pydicom.filereader import read_dataset

    dataset = read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    return dataset


def test_preference_decides_among_accepted_syntaxes(node) -> None:
    path = _file(JPEG_LS)
    assert _send(node, [path]) == [0x0000]
    header = pydicom.dcmread(path, stop_before_pixels=True)
    offered = [JPEGLSLossless, HTJ2KLossless, ExplicitVRLittleEndian]
    received, _ = _get(node, str(header.StudyInstanceUID), {str(header.SOPClassUID): offered})
    assert received[str(header.SOPInstanceUID)][0] == JPEGLSLossless  # "original" first by default


def test_preference_order() -> None:
    candidates = [HTJ2KLossless, HTJ2K, JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert preferred_order(candidates, JPEGLSLossless) == [JPEGLSLossless, HTJ2KLossless, HTJ2K,
                                                           ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert preferred_order(candidates, JPEGLSLossless, ["explicit", "htj2k"]) == [
        ExplicitVRLittleEndian, HTJ2KLossless, HTJ2K, JPEGLSLossless, ImplicitVRLittleEndian]
    # Received as Explicit VR LE: "original" names nothing, HTJ2K stays ahead of native output.
    native = [HTJ2KLossless, HTJ2K, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert preferred_order(native, ExplicitVRLittleEndian, DEFAULT_SYNTAX_PREFERENCE) == native
    big = [*native, ExplicitVRBigEndian]
    assert preferred_order(big, ExplicitVRBigEndian)[0] == ExplicitVRBigEndian
