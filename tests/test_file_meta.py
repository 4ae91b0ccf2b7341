"""The directly encoded File Meta Information group is what pydicom writes for the same elements."""

from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from dcbnode.dcbs.file_meta import received_file_meta
from dcbnode.dcbs.syntaxes import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def _pydicom_group(sop_class: str, sop_instance: str, syntax: str, source_ae: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@pytest.mark.parametrize("sop_instance, source_ae", [
    ("1.2.3", "CT01"),  # odd-length UID, even AE
    ("1.2.34", "MODALITY1"),  # even UID, odd AE
    ("1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678", ""),  # 64 characters, no AE
])
def test_same_bytes_as_pydicom(sop_instance: str, source_ae: str) -> None:
    args = ("1.2.840.10008.5.1.4.1.1.2", sop_instance, "1.2.840.10008.1.2.1", source_ae)
    assert received_file_meta(*args) == _pydicom_group(*args)
