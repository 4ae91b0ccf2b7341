"""Every Storage SOP Class, retired and private ones included, is accepted, stored and served back; the
conformance statement lists exactly the classes the code accepts.

Run this file as a script (``python tests/test_sop_classes.py``) to rewrite the list in
docs/conformance-statement.md after the code's list changed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom.sop_class
import pytest
from conftest import RunningNode, read_back, rebuilt_part10, stop_node
from faithful import element_differences, pixels_equal, read
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, UID_dictionary
from pynetdicom import AE, build_role, evt, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification, uid_to_service_class

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = REPO / "docs" / "conformance-statement.md"
BEGIN, END = "<!-- storage-sop-classes:begin -->", "<!-- storage-sop-classes:end -->"
RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired): pydicom-data's color-pl.dcm
#: A private SOP class UID (under dcbnode's own root): what a vendor's modality would propose.
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.1443.99.1.1"


def _serve_as_storage(uid: str) -> None:
    """What a stock pynetdicom peer does to send or receive a class pynetdicom does not know."""
    if not issubclass(uid_to_service_class(uid), StorageServiceClass):
        register_uid(uid, "TestStorage_" + uid.replace(".", "_"), StorageServiceClass)


def conformance_table() -> str:
    """The Markdown table of accepted Storage SOP Classes, as the conformance statement carries it."""
    from dcbnode.net.sop_classes import STORAGE_SOP_CLASSES

    rows = [f"| {_name(uid)} | `{uid}` |" for uid in STORAGE_SOP_CLASSES]
    return "\n".join([BEGIN, "", "| SOP Class | UID |", "|---|---|", *rows, "", END])


def _name(uid: str) -> str:
    """pydicom's name, "(Retired)" marked; for a class newer than pydicom's dictionary, pynetdicom's keyword."""
    if uid in UID_dictionary:
        name, _, _, retired, _ = UID_dictionary[uid]
        return f"{name} (Retired)" if retired and "Retired" not in name else name
    keywords = [keyword for keyword, value in vars(pynetdicom.sop_class).items()
                if value == uid and keyword[0].isupper()]
    return keywords[0] if keywords else uid


def _documented_table() -> str:
    text = CONFORMANCE.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def test_conformance_statement_lists_the_accepted_classes() -> None:
    assert _documented_table() == conformance_table(), "run: python tests/test_sop_classes.py"


def test_storage_classes_include_retired_and_exclude_non_storage() -> None:
    from pynetdicom import AllStoragePresentationContexts

    from dcbnode.net.sop_classes import STORAGE_SOP_CLASSES

    accepted = set(STORAGE_SOP_CLASSES)
    assert {str(c.abstract_syntax) for c in AllStoragePresentationContexts} <= accepted
    assert {RETIRED_US, "1.2.840.10008.5.1.4.1.1.3", "1.2.840.10008.5.1.4.1.1.9.1"} <= accepted
    assert not {"1.2.840.10008.1.20.1", "1.2.840.10008.1.3.10", "1.2.840.10008.1.1"} & accepted


def _private_ct() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    return ds


def _retired_us() -> Dataset:
    path = get_testdata_file("color-pl.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data's color-pl.dcm is not installed")
    return pydicom.dcmread(path)


def _associate(node: RunningNode, contexts: list[tuple[str, str]], **kwargs: Any) -> Any:
    ae = AE(ae_title="SOPSCU")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    return ae.associate(node.host, node.port, ae_title=node.aet, **kwargs)


def _get_back(node: RunningNode, ds: Dataset) -> list[bytes]:
    """C-GET ``ds``'s instance proposing only its class (SCP role) in Explicit VR LE; the received bytes."""
    received: list[bytes] = []

    def on_store(event: Any) -> int:
        received.append(event.encoded_dataset())
        return 0x0000

    sop_class = str(ds.SOPClassUID)
    assoc = _associate(node, [(StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian),
                              (sop_class, ExplicitVRLittleEndian)],
                       ext_neg=[build_role(sop_class, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    identifier.SOPInstanceUID = ds.SOPInstanceUID
    try:
        responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        statuses = [status.Status for status, _ in responses]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    return received


def test_retired_and_private_classes_stored_and_served(running_node) -> None:
    originals = [_retired_us(), _private_ct()]
    for ds in originals:
        _serve_as_storage(str(ds.SOPClassUID))
    node = running_node()
    assoc = _associate(node, [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in originals])
    assert assoc.is_established
    try:
        assert [assoc.send_c_store(ds).Status for ds in originals] == [0, 0], node.log()[-3000:]
    finally:
        assoc.release()
    for ds in originals:
        (got,) = _get_back(node, ds)
        received = read(got)
        assert received.SOPClassUID == ds.SOPClassUID
        assert received.SOPInstanceUID == ds.SOPInstanceUID
        assert pixels_equal(ds, received)
    assert "accepting private SOP class(es) " + PRIVATE_CLASS in node.log()
    assert stop_node(node) == 0
    archive = read_back(node.data_dir)
    try:
        for ds in originals:
            rebuilt = read(rebuilt_part10(archive, str(ds.SOPInstanceUID)))
            ds.file_meta.SourceApplicationEntityTitle = "SOPSCU"
            assert element_differences(ds, rebuilt) == []
    finally:
        archive.close()


def test_private_classes_refused_when_configured(running_node) -> None:
    node = running_node(tables={"storage": {"accept_unknown_sop_classes": False}})
    assoc = _associate(node, [(PRIVATE_CLASS, ExplicitVRLittleEndian), (RETIRED_US, ExplicitVRLittleEndian),
                              (Verification, ExplicitVRLittleEndian)])
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {RETIRED_US, Verification}
    assert rejected == {PRIVATE_CLASS}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's dcbnode, not an installed one
    text = CONFORMANCE.read_text()
    CONFORMANCE.write_text(text.replace(_documented_table(), conformance_table()))
    sys.exit(0)
