"""An independent raw DICOM element walker and writer: the oracle of the fidelity tests.

It knows nothing of dcbnode and converts no value: it splits a dataset's bytes into elements (tag, VR,
length, value bytes, and the items of sequences and of encapsulated Pixel Data) in Implicit VR Little
Endian, Explicit VR Little Endian, Explicit VR Big Endian and Deflated Explicit VR Little Endian
(inflated first), following PS3.5 7.1 (element encodings), 7.5 (sequences and items, defined and
undefined length), 6.2.2 (UN of undefined length holds Implicit VR LE) and A.4 (encapsulation).
Compressed transfer syntaxes are Explicit VR Little Endian outside Pixel Data.

The only knowledge borrowed from pydicom is its data dictionary, for the one thing Implicit VR cannot
say itself: which defined-length elements are sequences.  The writer (:func:`encode`) builds datasets
from ``(tag, VR, value bytes)`` so that crafted test cases hold exactly the bytes they mean to hold.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

from pydicom.datadict import dictionary_VR

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED})

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
#: VRs with a 2-byte reserved field and a 4-byte length in Explicit VR (PS3.5 Table 7.1-1).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: Value byte-order unit of each VR: what Big Endian swaps (PS3.5 7.3); AT is a pair of 16-bit words.
SWAP_UNIT = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OL": 4, "OF": 4,
             "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8}
KNOWN_VRS = LONG_VRS | frozenset(SWAP_UNIT) | frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI"})


class RawError(ValueError):
    """The bytes are not a dataset in the given encoding."""


@dataclass(frozen=True)
class Syntax:
    """How a dataset is encoded."""

    uid: str
    implicit: bool
    little: bool
    deflated: bool

    @property
    def native(self) -> bool:
        """Uncompressed pixel data."""
        return self.uid in NATIVE

    @classmethod
    def of(cls, uid: str) -> Syntax:
        """The encoding of transfer syntax ``uid`` (anything else than the four native ones: compressed,
        Explicit VR Little Endian)."""
        uid = uid.rstrip("\0 ")
        return cls(uid, uid == IMPLICIT_LE, uid != EXPLICIT_BE, uid == DEFLATED)


@dataclass(frozen=True)
class Item:
    """An item of a sequence (elements) or a fragment of encapsulated Pixel Data (``value``)."""

    length: int  # as declared: UNDEFINED for an undefined-length item
    elements: tuple[Element, ...] | None
    value: bytes  # the raw bytes of the item's content (without its delimiter)


@dataclass(frozen=True)
class Element:
    """One data element as encoded: ``vr`` is None in Implicit VR; ``value`` holds the raw value bytes
    (for an undefined-length element: everything up to, without, its sequence delimiter)."""

    tag: int
    vr: str | None
    length: int  # as declared: UNDEFINED for undefined length
    value: bytes
    items: tuple[Item, ...] | None  # sequences and encapsulated Pixel Data
    header: bytes

    @property
    def encoded(self) -> bytes:
        """Header and value as they were encoded (delimiters of undefined-length values excluded)."""
        return self.header + self.value


def tag_str(tag: int) -> str:
    """``(gggg,eeee)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _is_sequence_implicit(tag: int, length: int) -> bool:
    """Implicit VR: undefined length means a sequence (PS3.5 7.5.1) except encapsulated Pixel Data;
    a defined length is a sequence only when the dictionary says SQ."""
    if tag == PIXEL_DATA:
        return False
    if length == UNDEFINED:
        return True
    if tag >> 16 & 1:  # private: the dictionary cannot tell
        return False
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


class _Reader:
    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data, self.implicit, self.little = data, implicit, little
        self.end = "<" if little else ">"

    def _tag(self, offset: int) -> int:
        if offset + 4 > len(self.data):
            raise RawError(f"truncated tag at offset {offset}")
        group, element = struct.unpack_from(self.end + "HH", self.data, offset)
        return int(group << 16 | element)

    def elements(self, offset: int, stop: int, *, until_item_end: bool = False) -> tuple[list[Element], int]:
        """Elements from ``offset`` to ``stop`` (or to an item delimiter); returns them and the offset after."""
        out: list[Element] = []
        while offset < stop:
            tag = self._tag(offset)
            if tag == ITEM_END and until_item_end:
                return out, offset + 8
            element, offset = self.element(offset, stop)
            out.append(element)
        if until_item_end:
            raise RawError(f"item without delimiter ending at offset {stop}")
        return out, offset

    def element(self, offset: int, stop: int) -> tuple[Element, int]:
        start = offset
        tag = self._tag(offset)
        if tag >> 16 == 0xFFFE:
            raise RawError(f"unexpected delimiter {tag_str(tag)} at offset {offset}")
        vr: str | None = None
        if self.implicit:
            (length,) = struct.unpack_from(self.end + "L", self.data, offset + 4)
            offset += 8
        else:
            vr = self.data[offset + 4:offset + 6].decode("latin-1")
            if vr not in KNOWN_VRS:
                raise RawError(f"{tag_str(tag)}: unknown VR {vr!r} at offset {offset}")
            if vr in LONG_VRS:
                (length,) = struct.unpack_from(self.end + "L", self.data, offset + 8)
                offset += 12
            else:
                (length,) = struct.unpack_from(self.end + "H", self.data, offset + 6)
                offset += 8
        header = self.data[start:offset]
        is_sequence = vr == "SQ" or (vr is None and _is_sequence_implicit(tag, length))
        if length == UNDEFINED:
            if tag == PIXEL_DATA and vr != "UN":
                items, after, end = self.fragments(offset, stop)
            elif is_sequence or vr is None:
                items, after, end = self.items(offset, stop, UNDEFINED)
            elif vr == "UN":  # PS3.5 6.2.2: its content is Implicit VR Little Endian
                inner = _Reader(self.data, True, True)
                items, after, end = inner.items(offset, stop, UNDEFINED)
            else:
                raise RawError(f"{tag_str(tag)}: undefined length with VR {vr}")
            return Element(tag, vr, length, self.data[offset:end], tuple(items), header), after
        if offset + length > stop:
            raise RawError(f"{tag_str(tag)} needs {length} bytes at offset {offset}, {stop - offset} remain")
        items = None
        if is_sequence:
            items, _, _ = self.items(offset, offset + length, length)
        return Element(tag, vr, length, self.data[offset:offset + length],
                       None if items is None else tuple(items), header), offset + length

    def items(self, offset: int, stop: int, length: int) -> tuple[list[Item], int, int]:
        """Items of a sequence; returns (items, offset after the sequence, offset where its content ends)."""
        end = stop if length == UNDEFINED else offset + length
        items: list[Item] = []
        while offset < end:
            tag = self._tag(offset)
            (item_length,) = struct.unpack_from(self.end + "L", self.data, offset + 4)
            if tag == SEQUENCE_END and length == UNDEFINED:
                return items, offset + 8, offset
            if tag != ITEM:
                raise RawError(f"expected an item, found {tag_str(tag)} at offset {offset}")
            offset += 8
            if item_length == UNDEFINED:
                elements, after = self.elements(offset, end, until_item_end=True)
                items.append(Item(item_length, tuple(elements), self.data[offset:after - 8]))
            else:
                if offset + item_length > end:
                    raise RawError(f"item of {item_length} bytes overruns its sequence at offset {offset}")
                elements, after = self.elements(offset, offset + item_length)
                items.append(Item(item_length, tuple(elements), self.data[offset:after]))
            offset = after
        if length == UNDEFINED:
            raise RawError("sequence without delimiter")
        return items, offset, offset

    def fragments(self, offset: int, stop: int) -> tuple[list[Item], int, int]:
        """Items of encapsulated Pixel Data: the Basic Offset Table, then the fragments."""
        items: list[Item] = []
        while offset < stop:
            tag = self._tag(offset)
            (length,) = struct.unpack_from(self.end + "L", self.data, offset + 4)
            if tag == SEQUENCE_END:
                return items, offset + 8, offset
            if tag != ITEM or length == UNDEFINED or offset + 8 + length > stop:
                raise RawError(f"bad fragment {tag_str(tag)} at offset {offset}")
            items.append(Item(length, None, self.data[offset + 8:offset + 8 + length]))
            offset += 8 + length
        raise RawError("encapsulated Pixel Data without sequence delimiter")


@dataclass(frozen=True)
class Parsed:
    """A dataset's bytes (inflated if deflated), its encoding and its elements."""

    syntax: Syntax
    data: bytes
    elements: tuple[Element, ...]


def inflate(data: bytes) -> bytes:
    """The bytes of a Deflated Explicit VR Little Endian dataset, inflated (raw deflate, PS3.5 A.5)."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def parse_dataset(data: bytes, syntax_uid: str) -> Parsed:
    """Walk a dataset's bytes (no file meta) in the given transfer syntax."""
    syntax = Syntax.of(syntax_uid)
    if syntax.deflated:
        data = inflate(data)
    elements, _ = _Reader(data, syntax.implicit, syntax.little).elements(0, len(data))
    return Parsed(syntax, data, tuple(elements))


def split_part10(data: bytes) -> tuple[bytes, str, bytes]:
    """(file meta bytes, transfer syntax UID, dataset bytes) of a Part-10 file.

    A file without preamble and file meta is a bare dataset: its syntax is guessed from its first
    element as PS3.10 readers do (a valid explicit VR means Explicit VR Little Endian).
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        reader = _Reader(data, False, True)
        offset = 132
        syntax = ""
        while offset + 4 <= len(data) and reader._tag(offset) >> 16 == 0x0002:
            element, offset = reader.element(offset, len(data))
            if element.tag == 0x00020010:
                syntax = element.value.rstrip(b"\0 ").decode("ascii")
        if not syntax:
            raise RawError("file meta without Transfer Syntax UID")
        return data[132:offset], syntax, data[offset:]
    if data[4:6].decode("latin-1") in KNOWN_VRS:
        # Explicit VR: the byte order that reads the first group number as the smaller one
        little = struct.unpack_from("<H", data)[0] <= struct.unpack_from(">H", data)[0]
        return b"", EXPLICIT_LE if little else EXPLICIT_BE, data
    return b"", IMPLICIT_LE, data


def parse_part10(data: bytes, *, lenient: bool = False) -> Parsed:
    """Walk the dataset of a Part-10 file (or a bare dataset) in its transfer syntax.

    ``lenient``: a dataset that is not Explicit VR although its syntax says so is read as Implicit VR
    Little Endian, as pydicom and DCMTK read such files (the returned syntax says what was used).
    """
    _, syntax, dataset = split_part10(data)
    try:
        return parse_dataset(dataset, syntax)
    except RawError:
        if not lenient or Syntax.of(syntax).implicit or Syntax.of(syntax).deflated:
            raise
        elements, _ = _Reader(dataset, True, True).elements(0, len(dataset))
        return Parsed(replace(Syntax.of(syntax), implicit=True, little=True), dataset, tuple(elements))


def meta_elements(meta: bytes) -> tuple[Element, ...]:
    """The elements of a file meta group (always Explicit VR Little Endian, PS3.10 7.1)."""
    elements, _ = _Reader(meta, False, True).elements(0, len(meta))
    return tuple(elements)


def implicit_items(value: bytes) -> tuple[Item, ...]:
    """The items a defined-length UN (or unknown implicit) value holds, read as Implicit VR Little Endian
    (PS3.5 6.2.2); raises :class:`RawError` when it holds no items."""
    try:
        items, _, _ = _Reader(value, True, True).items(0, len(value), len(value))
    except struct.error as exc:
        raise RawError(f"not items: {exc}") from exc
    return tuple(items)


def find(parsed: Parsed | tuple[Element, ...], tag: int) -> Element | None:
    """The top-level element ``tag``, or None."""
    elements = parsed.elements if isinstance(parsed, Parsed) else parsed
    return next((e for e in elements if e.tag == tag), None)


def text(parsed: Parsed, tag: int) -> str | None:
    """A top-level string value with its padding removed, or None."""
    element = find(parsed, tag)
    return None if element is None else element.value.rstrip(b"\0 ").decode("latin-1")


def swapped_to_little(value: bytes, vr: str | None) -> bytes:
    """A Big Endian value in Little Endian order (by VR; strings, OB and UN are byte streams)."""
    unit = SWAP_UNIT.get(vr or "", 1)
    if unit == 1 or len(value) % unit:
        return value
    import numpy as np

    return np.frombuffer(value, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


# --------------------------------------------------------------------------- writer (crafted datasets)

#: A crafted element: (tag, VR, value bytes in Little Endian) or (tag, "SQ", [items]) where an item is a
#: list of crafted elements; ``defined`` chooses defined lengths for the sequence and its items.
Crafted = tuple


def encode(elements: list[Crafted], syntax_uid: str, *, defined: bool = False) -> bytes:
    """Dataset bytes for crafted elements (values given Little Endian; swapped by VR for Big Endian,
    deflated for Deflated)."""
    syntax = Syntax.of(syntax_uid)
    data = _encode(elements, syntax, defined)
    if syntax.deflated:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def _encode(elements: list[Crafted], syntax: Syntax, defined: bool) -> bytes:
    end = "<" if syntax.little else ">"
    out = bytearray()
    for tag, vr, value, *rest in elements:
        item_defined = rest[0] if rest else defined
        if vr == "SQ":
            body = b""
            for item in value:
                content = _encode(item, syntax, item_defined)
                if item_defined:
                    body += struct.pack(end + "HHL", 0xFFFE, 0xE000, len(content)) + content
                else:
                    body += struct.pack(end + "HHL", 0xFFFE, 0xE000, UNDEFINED) + content
                    body += struct.pack(end + "HHL", 0xFFFE, 0xE00D, 0)
            length = len(body) if item_defined else UNDEFINED
            if not item_defined:
                body += struct.pack(end + "HHL", 0xFFFE, 0xE0DD, 0)
        else:
            body = value if syntax.little else _to_big(value, vr)
            length = len(body)
        out += struct.pack(end + "HH", tag >> 16, tag & 0xFFFF)
        if syntax.implicit:
            out += struct.pack(end + "L", length)
        elif vr in LONG_VRS:
            out += vr.encode() + b"\0\0" + struct.pack(end + "L", length)
        else:
            out += vr.encode() + struct.pack(end + "H", length)
        out += body
    return bytes(out)


def _to_big(value: bytes, vr: str) -> bytes:
    unit = SWAP_UNIT.get(vr, 1)
    if unit == 1 or len(value) % unit:
        return value
    import numpy as np

    return np.frombuffer(value, dtype=f"<u{unit}").astype(f">u{unit}").tobytes()


def part10(dataset: bytes, syntax_uid: str, sop_class: str, sop_instance: str) -> bytes:
    """A Part-10 file around dataset bytes: preamble, ``DICM`` and a minimal file meta (PS3.10 7.1)."""
    def ui(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\0" * (len(raw) % 2)

    meta = _encode([(0x00020001, "OB", b"\0\1"), (0x00020002, "UI", ui(sop_class)),
                    (0x00020003, "UI", ui(sop_instance)), (0x00020010, "UI", ui(syntax_uid)),
                    (0x00020012, "UI", ui("1.2.826.0.1.3680043.10.1450.1")),
                    (0x00020013, "SH", b"FIDELITYPEER")], Syntax.of(EXPLICIT_LE), True)
    group_length = _encode([(0x00020000, "UL", struct.pack("<L", len(meta)))], Syntax.of(EXPLICIT_LE), True)
    return b"\0" * 128 + b"DICM" + group_length + meta + dataset
