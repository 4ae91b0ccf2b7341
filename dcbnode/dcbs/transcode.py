"""Rewrite a dataset's element headers from one uncompressed encoding to another, value bytes untouched.

PS3.5 7.1 defines three encodings of a dataset: Implicit VR Little Endian, Explicit VR Little Endian and
Explicit VR Big Endian (Deflated Explicit VR Little Endian is the second, deflated; every compressed
syntax uses the second).  Converting between them changes only element *headers*:

* implicit → explicit: the VR comes from the data dictionary; an element the dictionary does not know
  (private elements other than private creators, unknown public tags) becomes UN, as does one whose
  value is too long for its VR's 16-bit length field (PS3.5 6.2.2); an undefined-length element of
  unknown VR keeps its implicit VR content as UN (PS3.5 6.2.2 note, CP-246);
* explicit → implicit: the VR is dropped;
* little ↔ big endian: tag and length fields are swapped, and so are the values of binary VRs, in units
  of their size (PS3.5 7.3); strings, OB and UN are byte streams and never swapped;
* sequences are converted item by item; undefined lengths, item order and delimiters stay as received;
  the defined lengths of sequences and items are recomputed for the new headers.

Values are never decoded, so padding (spaces, NULs), odd lengths and private bytes survive exactly.
Group Length elements (gggg,0000) describe the encoding: they are kept as received, or recomputed for the
new encoding when ``recompute_group_lengths`` is set.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from .errors import InvalidDatasetError

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: Bytes per swapped unit of each binary VR (PS3.5 7.3); VRs not listed are byte streams.
_SWAP_SIZE = {"AT": 2, "OW": 2, "SS": 2, "US": 2, "FL": 4, "OF": 4, "OL": 4, "SL": 4, "UL": 4,
              "FD": 8, "OD": 8, "OV": 8, "SV": 8, "UV": 8}
_PIXEL_REPRESENTATION = 0x00280103


@dataclass(frozen=True, slots=True)
class Encoding:
    """One of the three dataset encodings of PS3.5 7.1."""

    implicit_vr: bool
    little_endian: bool


IMPLICIT_LE = Encoding(implicit_vr=True, little_endian=True)
EXPLICIT_LE = Encoding(implicit_vr=False, little_endian=True)
EXPLICIT_BE = Encoding(implicit_vr=False, little_endian=False)


def encoding_of(transfer_syntax: str) -> Encoding:
    """The dataset encoding a transfer syntax uses (deflated and compressed syntaxes: Explicit VR LE)."""
    if transfer_syntax == ImplicitVRLittleEndian:
        return IMPLICIT_LE
    return EXPLICIT_BE if transfer_syntax == ExplicitVRBigEndian else EXPLICIT_LE


@dataclass(slots=True)
class Element:
    """A raw element: its header facts and either value bytes or (for a parsed sequence) items."""

    tag: int
    vr: str  #: "" for an element read with implicit VR whose VR is not resolved yet
    value: bytes | memoryview  #: the value bytes (a whole undefined-length UN/OB value, delimiter included)
    undefined_length: bool = False
    items: list[Item] | None = None  #: set for a sequence (SQ) that was parsed item by item


@dataclass(slots=True)
class Item:
    """A sequence item and how its length was encoded."""

    elements: list[Element]
    undefined_length: bool


def transcode(data: bytes, source: Encoding, target: Encoding, *, recompute_group_lengths: bool = False) -> bytes:
    """``data`` (a run of top-level elements in ``source``) re-encoded in ``target``.

    Raises :class:`InvalidDatasetError` when the bytes do not form complete elements.
    """
    if source == target and not recompute_group_lengths:
        return bytes(data)
    elements = parse(data, source)
    if source.implicit_vr and not target.implicit_vr:
        resolve_vrs(elements, pixel_representation(elements, source))
    return encode(elements, source, target, recompute_group_lengths=recompute_group_lengths)


def parse(data: bytes | memoryview, encoding: Encoding) -> list[Element]:
    """The top-level elements of ``data``; raises :class:`InvalidDatasetError` if they are malformed."""
    view = memoryview(data)
    elements, end = _parse_run(view, 0, len(view), encoding, in_item=False)
    if end != len(view):
        raise InvalidDatasetError("dataset ends inside an element")
    return elements


def top_level_spans(data: bytes, encoding: Encoding = EXPLICIT_LE) -> Iterator[tuple[int, int, int]]:
    """(tag, start, end) of each top-level element of ``data``."""
    view = memoryview(data)
    position = 0
    while position < len(view):
        element, end = _parse_element(view, position, len(view), encoding)
        yield element.tag, position, end
        position = end


def skip_undefined(data: bytes, position: int, content: Encoding) -> int:
    """Position after the Sequence Delimitation Item closing the undefined-length value whose first item
    starts at ``position`` (its items encoded in ``content``)."""
    return _skip_undefined(memoryview(data), position, len(data), content)


# -- reading ---------------------------------------------------------------------------------------------


def _parse_run(view: memoryview, position: int, end: int, encoding: Encoding,
               *, in_item: bool) -> tuple[list[Element], int]:
    """Elements from ``position`` to ``end`` (or, in an undefined-length item, to its delimiter)."""
    elements: list[Element] = []
    while position < end:
        if in_item and _tag_at(view, position, encoding) == _ITEM_END:
            return elements, position
        element, position = _parse_element(view, position, end, encoding)
        elements.append(element)
    if position != end:
        raise InvalidDatasetError("an element runs past the end of its dataset or item")
    return elements, position


def _tag_at(view: memoryview, position: int, encoding: Encoding) -> int:
    if position + 4 > len(view):
        raise InvalidDatasetError("dataset ends inside an element header")
    group, element = struct.unpack_from("<HH" if encoding.little_endian else ">HH", view, position)
    return (group << 16) | element


def _parse_element(view: memoryview, position: int, end: int, encoding: Encoding) -> tuple[Element, int]:
    """The element at ``position`` and the position after it."""
    order = "<" if encoding.little_endian else ">"
    tag = _tag_at(view, position, encoding)
    if encoding.implicit_vr or tag >> 16 == 0xFFFE:
        if position + 8 > end:
            raise InvalidDatasetError("dataset ends inside an element header")
        vr, (length,), start = "", struct.unpack_from(order + "I", view, position + 4), position + 8
    else:
        if position + 8 > end:
            raise InvalidDatasetError("dataset ends inside an element header")
        vr = bytes(view[position + 4 : position + 6]).decode("latin-1")
        if vr in LONG_VRS:
            if position + 12 > end:
                raise InvalidDatasetError("dataset ends inside an element header")
            (length,), start = struct.unpack_from(order + "I", view, position + 8), position + 12
        elif vr.isalpha() and vr.isupper():
            (length,), start = struct.unpack_from(order + "H", view, position + 6), position + 8
        else:
            raise InvalidDatasetError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR")
    if length != _UNDEFINED:
        if start + length > end:
            raise InvalidDatasetError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end "
                                      "of its dataset")
        value = view[start : start + length]
        if vr == "SQ" or (encoding.implicit_vr and _dictionary_vr(tag) == "SQ"):
            items = _parse_items(view, start, start + length, encoding)
            return Element(tag, vr, value, items=items), start + length
        return Element(tag, vr, value), start + length
    if vr == "SQ" or (encoding.implicit_vr and _dictionary_vr(tag) == "SQ"):
        items, after = _parse_undefined_items(view, start, end, encoding)
        return Element(tag, vr, view[start:after], undefined_length=True, items=items), after
    # Encapsulated Pixel Data, or an undefined-length UN (or unknown implicit element) whose content is
    # implicit VR little endian (PS3.5 6.2.2): kept whole, delimiter included.
    content = IMPLICIT_LE if vr in ("UN", "") else encoding
    after = _skip_undefined(view, start, end, content)
    return Element(tag, vr, view[start:after], undefined_length=True), after


def _parse_items(view: memoryview, position: int, end: int, encoding: Encoding) -> list[Item]:
    items = []
    while position < end:
        item, position = _parse_item(view, position, end, encoding)
        items.append(item)
    return items


def _parse_undefined_items(view: memoryview, position: int, end: int, encoding: Encoding) -> tuple[list[Item], int]:
    """Items up to the Sequence Delimitation Item; returns them and the position after the delimiter."""
    items = []
    while True:
        if _tag_at(view, position, encoding) == _SEQUENCE_END:
            return items, position + 8
        item, position = _parse_item(view, position, end, encoding)
        items.append(item)


def _parse_item(view: memoryview, position: int, end: int, encoding: Encoding) -> tuple[Item, int]:
    order = "<" if encoding.little_endian else ">"
    if _tag_at(view, position, encoding) != _ITEM or position + 8 > end:
        raise InvalidDatasetError("a sequence holds something other than items")
    (length,) = struct.unpack_from(order + "I", view, position + 4)
    start = position + 8
    if length == _UNDEFINED:
        elements, delimiter = _parse_run(view, start, end, encoding, in_item=True)
        return Item(elements, undefined_length=True), delimiter + 8
    if start + length > end:
        raise InvalidDatasetError("a sequence item runs past the end of its sequence")
    elements, _ = _parse_run(view, start, start + length, encoding, in_item=False)
    return Item(elements, undefined_length=False), start + length


def _skip_undefined(view: memoryview, position: int, end: int, encoding: Encoding) -> int:
    """Position after the Sequence Delimitation Item that closes an undefined-length value."""
    order = "<" if encoding.little_endian else ">"
    while position + 8 <= end:
        tag = _tag_at(view, position, encoding)
        (length,) = struct.unpack_from(order + "I", view, position + 4)
        position += 8
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            raise InvalidDatasetError("an undefined-length value holds something other than items")
        if length == _UNDEFINED:
            _, delimiter = _parse_run(view, position, end, encoding, in_item=True)
            position = delimiter + 8
        else:
            position += length
    raise InvalidDatasetError("an undefined-length value has no Sequence Delimitation Item")


# -- VRs of implicit VR input ----------------------------------------------------------------------------


def _dictionary_vr(tag: int) -> str:
    """The dictionary VR ("" when unknown: private elements, unknown public tags)."""
    if tag & 0xFFFF == 0:
        return "UL"  # Group Length (PS3.5 7.2)
    if tag >> 16 & 1:  # private group
        return "LO" if 0x10 <= tag & 0xFFFF <= 0xFF else ""  # Private Creator (PS3.5 7.8.1)
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return ""
    return "" if vr == "NONE" else vr


def pixel_representation(elements: list[Element], encoding: Encoding, default: int | None = None) -> int:
    """(0028,0103) Pixel Representation among ``elements``, else ``default`` (else 0)."""
    for element in elements:
        if element.tag == _PIXEL_REPRESENTATION and len(element.value) >= 2:
            return struct.unpack_from("<H" if encoding.little_endian else ">H", element.value)[0]
    return default or 0


def resolve_vrs(elements: list[Element], pixel_representation: int) -> None:
    """Give each element read with implicit VR the VR explicit output uses (in place).

    Ambiguous dictionary VRs are settled as PS3.5 A.1 and Annex C of PS3.3 do: "US or SS" by Pixel
    Representation, "OB or OW" as OW (what implicit VR means for them), "US or OW" as US when the value
    fits a 16-bit length; the choice never changes value bytes (both are swapped alike in big endian).
    """
    for element in elements:
        if element.vr:
            continue
        vr = _dictionary_vr(element.tag)
        if element.undefined_length and element.items is None:
            vr = "OB" if element.tag == 0x7FE00010 else "UN"
        elif vr == "US or SS":
            vr = "SS" if pixel_representation == 1 else "US"
        elif vr == "OB or OW":
            vr = "OW"
        elif vr in ("US or OW", "US or SS or OW"):
            vr = "US" if len(element.value) <= 0xFFFF and vr == "US or OW" else (
                "OW" if len(element.value) > 0xFFFF else ("SS" if pixel_representation == 1 else "US"))
        elif " or " in vr:
            vr = vr.split(" or ")[0]
        if not vr or (vr not in LONG_VRS and len(element.value) > 0xFFFF):
            vr = "UN"  # PS3.5 6.2.2: a value longer than its VR's length field can hold
        element.vr = vr
        for item in element.items or ():
            resolve_vrs(item.elements, pixel_representation)


# -- writing ---------------------------------------------------------------------------------------------


def encode(elements: list[Element], source: Encoding, target: Encoding, *,
           recompute_group_lengths: bool = False) -> bytes:
    """Encode parsed elements (read in ``source``) in ``target``."""
    parts: list[bytes | memoryview] = []
    _encode_run(elements, source, target, recompute_group_lengths, parts)
    return b"".join(parts)


def _encode_run(elements: list[Element], source: Encoding, target: Encoding, recompute: bool,
                parts: list[bytes | memoryview]) -> int:
    """Append the encoded elements to ``parts``; return their total length."""
    lengths: list[int] = []
    value_parts: list[int | None] = []  # where a recomputed Group Length value goes in ``parts``
    for element in elements:
        is_group_length = recompute and element.tag & 0xFFFF == 0 and len(element.value) == 4
        value_parts.append(len(parts) + 1 if is_group_length else None)
        lengths.append(_encode_element(element, source, target, recompute, parts))
    order = "<" if target.little_endian else ">"
    for index, value_part in enumerate(value_parts):
        if value_part is not None:
            group = elements[index].tag >> 16
            following = sum(length for element, length in zip(elements[index + 1 :], lengths[index + 1 :],
                                                               strict=True) if element.tag >> 16 == group)
            parts[value_part] = struct.pack(order + "I", following)
    return sum(lengths)


def _encode_element(element: Element, source: Encoding, target: Encoding, recompute: bool,
                    parts: list[bytes | memoryview]) -> int:
    order = "<" if target.little_endian else ">"
    header_index = len(parts)
    parts.append(b"")  # the header, once the length is known
    if element.items is not None:
        length = 0
        for item in element.items:
            length += _encode_item(item, source, target, recompute, parts)
        if element.undefined_length:
            parts.append(struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0))
            length += 8
    else:
        parts.append(_value(element, source, target))
        length = len(parts[-1])
    declared = _UNDEFINED if element.undefined_length else length
    parts[header_index] = element_header(element.tag, element.vr or "UN", declared, target)
    return len(parts[header_index]) + length


def _encode_item(item: Item, source: Encoding, target: Encoding, recompute: bool,
                 parts: list[bytes | memoryview]) -> int:
    order = "<" if target.little_endian else ">"
    header_index = len(parts)
    parts.append(b"")
    length = _encode_run(item.elements, source, target, recompute, parts)
    if item.undefined_length:
        parts.append(struct.pack(order + "HHI", 0xFFFE, 0xE00D, 0))
        length += 8
    parts[header_index] = struct.pack(order + "HHI", 0xFFFE, 0xE000, _UNDEFINED if item.undefined_length else length)
    return 8 + length


def element_header(tag: int, vr: str, length: int, target: Encoding) -> bytes:
    """An element header in ``target`` (``length`` 0xFFFFFFFF for an undefined length)."""
    order = "<" if target.little_endian else ">"
    if target.implicit_vr:
        return struct.pack(order + "HHI", tag >> 16, tag & 0xFFFF, length)
    if vr in LONG_VRS:
        return struct.pack(order + "HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    if length > 0xFFFF:
        raise InvalidDatasetError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is too long for VR {vr}")
    return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _value(element: Element, source: Encoding, target: Encoding) -> bytes | memoryview:
    """The value bytes in ``target``'s byte order."""
    value = element.value
    size = _SWAP_SIZE.get(element.vr, 1)
    if source.little_endian == target.little_endian or size == 1 or element.undefined_length:
        return value
    return swap_bytes(value, size)


def swap_bytes(value: bytes | memoryview, size: int) -> bytes:
    """``value`` with each ``size``-byte unit reversed (a trailing partial unit is left as it is)."""
    usable = len(value) - len(value) % size
    swapped = bytearray(value)
    for offset in range(size):
        swapped[offset:usable:size] = value[size - 1 - offset : usable : size]
    return bytes(swapped)
