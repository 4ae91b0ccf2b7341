"""header_identity's walk reads what the generic top-level walk (``_top_level``) reads, for any bytes.

Records written before rely on it: a COMPACT record leaves out of its JSON each identity field its header
gives back, and reading derives them again from the same bytes, so the two walks must agree byte for
byte, on damaged and unusual headers too.
"""

from __future__ import annotations

import random
import struct
from io import BytesIO

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset

from dcbnode.dcbs.dataset_split import _IDENTITY_TAGS, _LAST_IDENTITY_TAG, _identity_values, _top_level
from dcbnode.dcbs.errors import InvalidDatasetError

FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "waveform_ecg.dcm", "JPEG2000.dcm", "SC_rgb.dcm"]


def _walked(header: bytes) -> dict[int, bytes]:
    """The values as the element-by-element walk reads them (what header_identity did before)."""
    values: dict[int, bytes] = {}
    try:
        for tag, _, start, length in _top_level(header, _LAST_IDENTITY_TAG):
            if length != 0xFFFFFFFF and tag in _IDENTITY_TAGS:
                values[tag] = header[start : start + length]
    except (struct.error, ValueError, InvalidDatasetError):
        pass
    return values


def _explicit_le(name: str) -> bytes:
    dataset = pydicom.dcmread(get_testdata_file(name, download=False))
    out = DicomFileLike(BytesIO())
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, dataset)
    return out.parent.getvalue()


@pytest.mark.parametrize("name", FILES)
def test_identity_walk_agrees_on_damaged_headers(name: str) -> None:
    header = _explicit_le(name)
    assert _identity_values(header) == _walked(header) and _walked(header)
    rng = random.Random(name)
    for _ in range(400):
        damaged = bytearray(header[: rng.randrange(len(header) + 1)] if rng.random() < 0.3 else header)
        for _ in range(rng.randrange(1, 4)):
            if damaged:
                position = rng.randrange(min(len(damaged), 2000))
                damaged[position] = rng.choice([rng.randrange(256), 0xFF, 0x00])
        assert _identity_values(bytes(damaged)) == _walked(bytes(damaged)), name


def test_undefined_lengths_before_the_identity_elements_are_skipped_alike() -> None:
    headers = [_explicit_le(name) for name in FILES]
    undefined = [h for h in headers if any(length == 0xFFFFFFFF for *_, length in _top_level(h, _LAST_IDENTITY_TAG))]
    assert undefined  # the damaged-header test covers sequences written with undefined length too
    for header in undefined:
        assert _identity_values(header) == _walked(header)
