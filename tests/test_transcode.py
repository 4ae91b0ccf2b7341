"""Element headers rewritten between encodings, value bytes untouched (``dcbs/transcode.py``), and what
that means end to end: an instance stored from Implicit VR or Big Endian comes back with the very bytes it
was sent in, and in another syntax with every value's bytes as sent.

The datasets here are built from raw bytes by a writer of the test's own, never by pydicom values, so
padding, odd lengths and undefined lengths are exactly what a broken or unusual sender would put on the wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dcbnode.dcbs import encode_instance, rebuild
from dcbnode.dcbs.errors import InvalidDatasetError
from dcbnode.dcbs.file_meta import received_file_meta
from dcbnode.dcbs.transcode import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, Encoding, parse, transcode

_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_SWAP = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4, "FD": 8, "OD": 8}
UNDEFINED = 0xFFFFFFFF


@dataclass
class E:
    """A test element: value bytes in little endian, or items (lists of elements) for a sequence."""

    tag: int
    vr: str
    value: bytes = b""
    items: list[list[E]] | None = None
    undefined: bool = False  #: undefined length (sequences and their items alike)
    item_undefined: list[bool] = field(default_factory=list)


def write(elements: list[E], encoding: Encoding, *, explicit_vr_of=lambda e: e.vr) -> bytes:
    """The test's own writer: headers per PS3.5 7.1, values swapped per VR for big endian."""
    order = "<" if encoding.little_endian else ">"
    out = b""
    for element in elements:
        if element.items is not None:
            body = b""
            for index, item in enumerate(element.items):
                content = write(item, encoding, explicit_vr_of=explicit_vr_of)
                undefined = index < len(element.item_undefined) and element.item_undefined[index]
                if undefined:
                    body += struct.pack(order + "HHI", 0xFFFE, 0xE000, UNDEFINED) + content
                    body += struct.pack(order + "HHI", 0xFFFE, 0xE00D, 0)
                else:
                    body += struct.pack(order + "HHI", 0xFFFE, 0xE000, len(content)) + content
            if element.undefined:
                body += struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0)
            value, length = body, UNDEFINED if element.undefined else len(body)
        else:
            value = element.value
            size = _SWAP.get(element.vr, 1)
            if not encoding.little_endian and size > 1:
                value = b"".join(value[i : i + size][::-1] for i in range(0, len(value), size))
            length = len(value)
        group, number = element.tag >> 16, element.tag & 0xFFFF
        vr = explicit_vr_of(element)
        if encoding.implicit_vr:
            out += struct.pack(order + "HHI", group, number, length)
        elif vr in _LONG:
            out += struct.pack(order + "HH2sHI", group, number, vr.encode(), 0, length)
        else:
            out += struct.pack(order + "HH2sH", group, number, vr.encode(), length)
        out += value
    return out


def text(value: str) -> bytes:
    return value.encode("latin-1")


def crafted(sop_instance_uid: str) -> list[E]:
    """Every kind of value a faithful archive must keep: paddings, empties, odd lengths, private data,
    nested undefined-length sequences, group lengths at the top level and inside items."""
    nested = [E(0x00080100, "SH", text("LEVEL3 ")), E(0x00080102, "SH", text("DCM\0"))]
    level2 = [E(0x00080104, "LO", text("two  ")),
              E(0x0040A730, "SQ", items=[nested], undefined=True, item_undefined=[True])]
    level1 = [E(0x00080000, "UL", struct.pack("<I", 0)),  # a retired group length inside an item
              E(0x00080100, "SH", text("ONE")),  # odd length, as broken senders write
              E(0x0040A730, "SQ", items=[level2], undefined=True, item_undefined=[False])]
    return [
        E(0x00080000, "UL", struct.pack("<I", 0)),  # value fixed below: the group length as sent
        E(0x00080005, "CS", text("ISO_IR 100")),
        E(0x00080008, "CS", text("ORIGINAL\\PRIMARY ")),
        E(0x00080016, "UI", text("1.2.840.10008.5.1.4.1.1.7\0")),
        E(0x00080018, "UI", text(sop_instance_uid) + (b"\0" if len(sop_instance_uid) % 2 else b"")),
        E(0x00080020, "DA", b""),  # empty value
        E(0x00080050, "SH", text("  ")),  # all spaces
        E(0x00080060, "CS", text("OT")),
        E(0x00080080, "LO", text("AB" + " " * 10)),
        E(0x00080081, "ST", text("NULPAD\0\0")),
        E(0x00081030, "LO", text("odd")),
        E(0x00082111, "ST", text("trailing spaces   ")),
        E(0x00090010, "LO", text("ACME 1.1 ")),  # private creator
        E(0x00091001, "LO", text("private text\0\0")),  # private, creator known
        E(0x00091002, "UN", bytes(range(7))),  # private, odd length
        E(0x00110010, "LO", text("")),  # an empty private creator
        E(0x00111001, "LT", text("no creator for this one  ")),
        E(0x00100010, "PN", text("Doe^Jane^^^ ")),
        E(0x00100020, "LO", text("ID\0")),
        E(0x0020000D, "UI", text("1.2.3.4.5.6\0")),
        E(0x0020000E, "UI", text("1.2.3.4.5.7\0")),
        E(0x00200013, "IS", text("7 ")),
        E(0x00321060, "LO", text("")),
        E(0x0040A730, "SQ", items=[level1, [E(0x00080100, "SH", text("SECOND"))]], undefined=True,
          item_undefined=[True, False]),
        E(0x00281201, "OW", struct.pack("<4H", 0, 1, 256, 65535)),  # palette data: swapped in big endian
        E(0x00280106, "US", struct.pack("<H", 3)),
        E(0x00280120, "US", struct.pack("<H", 0xFFFF)),
        E(0x4001_0010, "LO", text("VENDOR")),
        E(0x4001_1010, "UN", text("a private value of ours")),
    ]


def with_group_lengths(elements: list[E], encoding: Encoding, explicit_vr_of) -> list[E]:
    """Set each (gggg,0000), in items too, to its group's length in ``encoding``, as a careful sender would."""
    out = [E(e.tag, e.vr, e.value, [with_group_lengths(item, encoding, explicit_vr_of) for item in e.items],
             e.undefined, e.item_undefined) if e.items is not None else e for e in elements]
    for index, element in enumerate(out):
        if element.tag & 0xFFFF == 0:
            group = [e for e in out[index + 1 :] if e.tag >> 16 == element.tag >> 16]
            length = len(write(group, encoding, explicit_vr_of=explicit_vr_of))
            out[index] = E(element.tag, "UL", struct.pack("<I", length))
    return out


def dictionary_vr(element: E) -> str:
    """What a reader of implicit VR data must label each crafted element in explicit VR."""
    if element.tag >> 16 & 1 and element.tag & 0xFFFF > 0xFF:
        return "UN"  # private data elements: the dictionary cannot know them
    if element.tag == 0x00281201:
        return "OW"
    return element.vr


def part10(dataset: bytes, syntax: str, sop_instance_uid: str) -> bytes:
    meta = received_file_meta("1.2.840.10008.5.1.4.1.1.7", sop_instance_uid, syntax, "TEST")
    return b"\0" * 128 + b"DICM" + meta + dataset


def _sent(syntax: str) -> tuple[bytes, bytes, str]:
    """(Part-10 bytes, dataset bytes, SOP Instance UID) of the crafted dataset sent in ``syntax``."""
    uid = generate_uid()
    encoding = IMPLICIT_LE if syntax == ImplicitVRLittleEndian else (
        EXPLICIT_BE if syntax == ExplicitVRBigEndian else EXPLICIT_LE)
    elements = with_group_lengths(crafted(uid), encoding, lambda e: e.vr)
    dataset = write(elements, encoding)
    if syntax == DeflatedExplicitVRLittleEndian:
        import zlib

        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset = deflater.compress(dataset) + deflater.flush()
    return part10(dataset, syntax, uid), dataset, uid


SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_same_syntax_gives_the_bytes_that_were_sent(syntax: str) -> None:
    data, dataset, _ = _sent(syntax)
    encoded = encode_instance(data)
    rebuilt = rebuild(encoded.meta, encoded.blobs, lambda i: encoded.frames[i], syntax)
    assert rebuilt.dataset == dataset


@pytest.mark.parametrize("sent", SYNTAXES, ids=lambda s: s.name)
@pytest.mark.parametrize("output", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=lambda s: s.name)
def test_other_syntax_keeps_every_value_and_recomputes_group_lengths(sent: str, output: str) -> None:
    data, _, uid = _sent(sent)
    encoded = encode_instance(data)
    rebuilt = rebuild(encoded.meta, encoded.blobs, lambda i: encoded.frames[i], output)
    target = IMPLICIT_LE if output == ImplicitVRLittleEndian else EXPLICIT_LE
    # From implicit VR the VRs come from the dictionary (private elements become UN); otherwise as sent.
    vr_of = dictionary_vr if sent == ImplicitVRLittleEndian else (lambda e: e.vr)
    expected = write(with_group_lengths(crafted(uid), target, vr_of), target, explicit_vr_of=vr_of)
    assert rebuilt.dataset == expected


def test_big_endian_binary_values_are_swapped_by_vr_and_strings_are_not() -> None:
    uid = generate_uid()
    elements = crafted(uid)
    big = write(elements, EXPLICIT_BE)
    little = transcode(big, EXPLICIT_BE, EXPLICIT_LE)
    assert little == write(elements, EXPLICIT_LE)
    assert transcode(little, EXPLICIT_LE, EXPLICIT_BE) == big


def test_implicit_value_too_long_for_its_vr_becomes_un() -> None:
    long_text = b"x" * 70000  # LT's explicit length field holds 65535 at most
    implicit = write([E(0x00204000, "LT", long_text)], IMPLICIT_LE)
    explicit = transcode(implicit, IMPLICIT_LE, EXPLICIT_LE)
    assert explicit == struct.pack("<HH2sHI", 0x0020, 0x4000, b"UN", 0, 70000) + long_text
    assert transcode(explicit, EXPLICIT_LE, IMPLICIT_LE) == implicit


def test_undefined_length_unknown_element_stays_implicit_inside_un() -> None:
    """PS3.5 6.2.2: an unknown undefined-length element read with implicit VR becomes UN whose content
    stays implicit VR little endian; back in implicit VR it is exactly what was sent."""
    inner = write([E(0x00291001, "LO", text("inner "))], IMPLICIT_LE)
    content = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    implicit = struct.pack("<HHI", 0x0029, 0x0010, 4) + b"CR1 " + struct.pack("<HHI", 0x0029, 0x1010,
                                                                               UNDEFINED) + content
    explicit = transcode(implicit, IMPLICIT_LE, EXPLICIT_LE)
    assert explicit.endswith(struct.pack("<HH2sHI", 0x0029, 0x1010, b"UN", 0, UNDEFINED) + content)
    assert transcode(explicit, EXPLICIT_LE, IMPLICIT_LE) == implicit


@pytest.mark.parametrize("cut", [3, 7, 11, 40])
def test_truncated_element_runs_are_refused(cut: int) -> None:
    data = write(crafted(generate_uid()), EXPLICIT_LE)
    with pytest.raises(InvalidDatasetError):
        parse(data[:-cut], EXPLICIT_LE)
