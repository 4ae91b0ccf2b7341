"""Crafted instances, written byte by byte (:func:`rawdicom.encode`, never pydicom values): every padding a
sender may use in every string VR, empty and all-space values, odd lengths from broken senders, private
tags with and without a private creator, retired group lengths at the top level and inside items, and
undefined-length sequences nested three deep; in Implicit VR LE, Explicit VR LE, Explicit VR BE and
Deflated Explicit VR LE (:data:`CRAFTED`: name -> Part-10 bytes).
"""

from __future__ import annotations

import struct

import numpy as np
import rawdicom
from pydicom.datadict import dictionary_VR, tag_for_keyword

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ROOT = "1.2.826.0.1.3680043.10.1450.14"
SYNTAXES = {"implicit": rawdicom.IMPLICIT_LE, "explicit": rawdicom.EXPLICIT_LE,
            "bigendian": rawdicom.EXPLICIT_BE, "deflated": rawdicom.DEFLATED}

#: One attribute of each string VR, and a valid value for it (any nesting level accepts any attribute).
STRING_VRS = {"AE": ("ScheduledStationAETitle", b"STATION"), "AS": ("PatientAge", b"030Y"),
              "CS": ("ConversionType", b"WSD"), "DA": ("ScheduledProcedureStepStartDate", b"20240102"),
              "DS": ("SliceThickness", b"1.5"), "DT": ("AcquisitionDateTime", b"20240102030405"),
              "IS": ("AcquisitionNumber", b"7"), "LO": ("ScheduledProcedureStepDescription", b"DESCR"),
              "LT": ("CommentsOnTheScheduledProcedureStep", b"long text"),
              "PN": ("ScheduledPerformingPhysicianName", b"DOE^JANE"),
              "SH": ("ScheduledProcedureStepID", b"STEP1"),
              "ST": ("CommentsOnThePerformedProcedureStep", b"short text"),
              "TM": ("ScheduledProcedureStepStartTime", b"120000"), "UC": ("LongCodeValue", b"LONGCODE"),
              "UI": ("ReferencedSOPClassUID", b"1.2.840.10008.5.1.4.1.1.7"),
              "UR": ("URNCodeValue", b"http://example.org/x"), "UT": ("TextValue", b"unlimited text")}

#: How each item of the padding sequence pads its values (every value of even length unless broken).
PADDINGS = {"spaces": lambda v: v + b" " * (2 + len(v) % 2), "nuls": lambda v: v + b"\0" * (2 + len(v) % 2),
            "all-spaces": lambda v: b" " * 6, "empty": lambda v: b"",
            "odd-length": lambda v: v + b"X" * (1 - len(v) % 2)}


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


def _element(keyword: str, vr: str, value: bytes) -> tuple:
    tag = _tag(keyword)
    assert dictionary_VR(tag) == vr, (keyword, dictionary_VR(tag), vr)
    return (tag, vr, value)


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _with_group_lengths(elements: list[tuple], syntax: str, groups: set[int]) -> list[tuple]:
    """Elements plus correct retired group lengths (gggg,0000) for ``groups`` (PS3.5 7.2), sorted."""
    out = list(elements)
    for group in groups:
        members = sorted((e for e in elements if e[0] >> 16 == group), key=lambda e: e[0])
        size = len(rawdicom.encode(members, syntax if syntax != rawdicom.DEFLATED else rawdicom.EXPLICIT_LE))
        out.append((group << 16, "UL", struct.pack("<L", size)))
    return sorted(out, key=lambda e: e[0])


def _padding_items(syntax: str) -> list[list[tuple]]:
    """One item per padding, each holding one attribute of every string VR padded that way; the first
    item also carries retired group lengths."""
    items = []
    for index, pad in enumerate(PADDINGS.values()):
        item = [_element(keyword, vr, pad(value)) for vr, (keyword, value) in STRING_VRS.items()]
        items.append(_with_group_lengths(item, syntax, {0x0040, 0x0008} if index == 0 else set()))
    return items


def _nested(depth: int) -> list[tuple]:
    """Undefined-length sequences nested ``depth`` deep, a code item at the bottom."""
    if depth == 0:
        return [_element("CodeValue", "SH", b"C0DE  "), _element("CodingSchemeDesignator", "SH", b"DCM\0"),
                _element("CodeMeaning", "LO", b"meaning ")]
    keyword = {3: "ReferencedSeriesSequence", 2: "ReferencedImageSequence", 1: "ContentSequence"}[depth]
    inner = [*_nested(depth - 1), _element("ReferencedSOPInstanceUID", "UI", _ui(f"{ROOT}.9.{depth}"))]
    return [(_tag(keyword), "SQ", [sorted(inner, key=lambda e: e[0]), [_element("CodeValue", "SH", b"2ND ")]],
             False)]


def crafted_instance(name: str, syntax: str, number: int) -> bytes:
    """The crafted instance ``number`` in ``syntax``, as a Part-10 file."""
    sop_instance = f"{ROOT}.1.{number}"
    pixels = np.arange(16, dtype="<u2").reshape(4, 4) * 257
    elements = [
        _element("SpecificCharacterSet", "CS", b"ISO_IR 100"),
        _element("SOPClassUID", "UI", _ui(SECONDARY_CAPTURE)), _element("SOPInstanceUID", "UI", _ui(sop_instance)),
        _element("StudyDate", "DA", b"20240102"), _element("Modality", "CS", b"OT"),
        _element("ConversionType", "CS", b"WSD "),
        _element("InstitutionName", "LO", b"AB" + b" " * 10),
        _element("InstitutionAddress", "ST", b"Street 1\0\0"),
        _element("StudyDescription", "LO", b"    "),
        _element("SeriesDescription", "LO", b""),
        _element("ManufacturerModelName", "LO", b"ABC"),  # odd length: a broken sender
        (_tag("ProcedureCodeSequence"), "SQ", [[_element("CodeValue", "SH", b"P1  ")]], True),
        *_nested(3),
        (0x00090010, "LO", b"FIDELITY CREATOR  "),
        (0x00091001, "LT", b"private text  \r\n  with spaces   "),
        (0x00091002, "SQ", [[(0x00091003, "LO", b"IN PRIVATE ITEM ")]], False),
        _element("PatientName", "PN", b"DOE^JOHN    "),
        _element("PatientID", "LO", b"ID1\0"),
        _element("PatientComments", "LT", b"text  with   spaces      "),
        (0x00111001, "LO", b"NO CREATOR "),  # a private element without its private creator
        _element("StudyInstanceUID", "UI", _ui(f"{ROOT}.2")),
        _element("SeriesInstanceUID", "UI", _ui(f"{ROOT}.3.{number}")),
        _element("StudyID", "SH", b"  "),
        _element("SeriesNumber", "IS", b"1 "), _element("InstanceNumber", "IS", f" {number}".encode()[-2:]),
        _element("ImageComments", "LT", b""),
        _element("SamplesPerPixel", "US", _us(1)), _element("PhotometricInterpretation", "CS", b"MONOCHROME2 "),
        _element("Rows", "US", _us(4)), _element("Columns", "US", _us(4)),
        _element("BitsAllocated", "US", _us(16)), _element("BitsStored", "US", _us(12)),
        _element("HighBit", "US", _us(11)), _element("PixelRepresentation", "US", _us(0)),
        (_tag("RequestAttributesSequence"), "SQ", _padding_items(syntax), False),
        (0x7FE00010, "OW", pixels.tobytes()),
    ]
    elements = _with_group_lengths(elements, syntax, {0x0008, 0x0010, 0x0028})
    return rawdicom.part10(rawdicom.encode(elements, syntax), syntax, SECONDARY_CAPTURE, sop_instance)


CRAFTED: dict[str, bytes] = {f"crafted-{name}.dcm": crafted_instance(name, syntax, number)
                             for number, (name, syntax) in enumerate(SYNTAXES.items(), start=1)}
