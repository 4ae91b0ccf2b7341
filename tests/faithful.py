"""Element-by-element and pixel-by-pixel comparison of a rebuilt instance with its original."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import generate_uid

#: Elements a change of transfer syntax legitimately changes (PS3.5 8.2 and A.4).
SYNTAX_DEPENDENT = frozenset({0x00280004, 0x00280006, 0x7FE00001, 0x7FE00002, 0x7FE00010, 0x7FE00008,
                              0x7FE00009})
#: Group Length elements (gggg,0000) are retired and depend on the encoding; a re-encoded header drops them.


def is_group_length(tag: int) -> bool:
    """True for a retired Group Length element."""
    return tag & 0xFFFF == 0


#: File meta elements that describe the writer or the encoding.
WRITER_META = frozenset({0x00020000, 0x00020001, 0x00020010, 0x00020012, 0x00020013})


def read(source: bytes | str | Path) -> Dataset:
    """Parse Part-10 bytes or a file."""
    return pydicom.dcmread(BytesIO(source) if isinstance(source, bytes) else source, force=True)


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded dataset of Part-10 bytes, after the file meta group (which names the writer)."""
    stream = BytesIO(part10)
    pydicom.filereader.read_preamble(stream, False)
    pydicom.filereader._read_file_meta_info(stream)
    return part10[stream.tell():]


def element_differences(original: Dataset, rebuilt: Dataset) -> list[str]:
    """Tags whose values differ (syntax-dependent elements excepted), described."""
    problems = []
    tags = {t for t in (set(original.keys()) | set(rebuilt.keys())) - SYNTAX_DEPENDENT if not is_group_length(t)}
    for tag in sorted(tags):
        if tag not in original or tag not in rebuilt:
            problems.append(f"{tag} present only in {'original' if tag in original else 'rebuilt'}")
            continue
        a, b = original[tag], rebuilt[tag]
        if a.value != b.value and _implicit_bytes(a) != _implicit_bytes(b):
            problems.append(f"{tag} {a.keyword}: {a.value!r:.60} != {b.value!r:.60}")
    for tag in set(original.file_meta.keys()) - WRITER_META - {0x00020002, 0x00020003}:
        if original.file_meta.get(tag) != rebuilt.file_meta.get(tag):
            problems.append(f"file meta {tag} differs")
    # The Media Storage UIDs must name the dataset's SOP class and instance (PS3.10 7.1).
    if rebuilt.file_meta.MediaStorageSOPInstanceUID != rebuilt.SOPInstanceUID:
        problems.append("MediaStorageSOPInstanceUID does not match SOPInstanceUID")
    return problems


def _implicit_bytes(element: DataElement) -> bytes:
    """The element's value as Implicit VR Little Endian bytes: equal bytes, equal element.

    A VR guessed differently by a reader (UN against UT, US against OW in an implicit file) changes
    the decoded Python value but not the bytes.
    """
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_data_element(buffer, element)
    return buffer.getvalue()


def pixels_equal(original: Dataset, rebuilt: Dataset) -> bool:
    """True when pydicom decodes the same pixel array from both."""
    if "PixelData" not in original and "FloatPixelData" not in original and "DoubleFloatPixelData" not in original:
        return True
    return bool(np.array_equal(original.pixel_array, rebuilt.pixel_array))


def ct_series(count: int, *, series_uid: str | None = None, study_uid: str | None = None) -> list[Dataset]:
    """``count`` copies of pydicom's CT_small as one series: new SOP Instance UIDs, InstanceNumber 1..count."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    out = []
    for number in range(count):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta = FileMetaDataset(base.file_meta)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number + 1
        out.append(ds)
    return out
