"""Split a received DICOM stream into file meta, header, pixel data element and suffix.

The header (every element before Pixel Data) is kept in Explicit VR Little Endian.  When the dataset
arrived in that encoding (as do all compressed syntaxes) its bytes are sliced out unchanged, so they
are spliced back later without any per-element rebuild; other encodings are re-encoded once by pydicom.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from .errors import InvalidDatasetError
from .transcode import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    Encoding,
    encode,
    encoding_of,
    parse,
    pixel_representation,
    resolve_vrs,
    skip_undefined,
)

#: Top-level pixel data elements: Pixel Data, Float Pixel Data, Double Float Pixel Data.
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
#: SOP Instance UID, Instance Number, Image Position (Patient): what :func:`header_identity` reads.
_IDENTITY_TAGS = (0x00080018, 0x00200013, 0x00200032)
_LAST_IDENTITY_TAG = _IDENTITY_TAGS[-1]
#: Top-level elements that some output forms replace or drop; their byte spans are recorded.
PATCHABLE_TAGS = (0x00280000, 0x00280004, 0x00280006, 0x7FE00000, 0x7FE00001, 0x7FE00002)
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def span_key(tag: int) -> str:
    """The key under which a tag's byte span is recorded ("00280004")."""
    return f"{tag:08X}"


@dataclass(frozen=True, slots=True)
class SplitDataset:
    """A received dataset taken apart."""

    dataset: Dataset  #: parsed by pydicom (elements are decoded lazily)
    transfer_syntax: UID
    file_meta: bytes  #: the group 2 elements as received, without preamble and "DICM"
    header: bytes  #: elements before the pixel data element, Explicit VR Little Endian
    suffix: bytes  #: elements after the pixel data element, Explicit VR Little Endian
    spans: dict[str, list[int]]  #: byte spans in ``header`` of the PATCHABLE_TAGS present
    pixel_element: RawDataElement | None
    received_length: int
    encoding: Encoding  #: how the dataset was really encoded (its header and suffix are now Explicit VR LE)


def split_dataset(data: bytes | memoryview, *, transfer_syntax: str | None = None,
                  file_meta: bytes | None = None) -> SplitDataset:
    """Parse Part-10 bytes (or a bare dataset with ``transfer_syntax``, and ``file_meta`` to keep with it:
    what a C-STORE delivers) and split it.

    Every element keeps its value bytes as received: a dataset that is not Explicit VR Little Endian
    has only its element headers rewritten (``transcode``), a deflated one is inflated first.
    Raises :class:`InvalidDatasetError` when the stream cannot be parsed.
    """
    data = bytes(data)
    if file_meta is None:
        meta_start, meta_end = _meta_start(data), _file_meta_end(data)
        file_meta = data[meta_start:meta_end]
    else:
        meta_end = 0
    syntax = transfer_syntax or _meta_transfer_syntax(file_meta)
    if syntax is None:  # no file meta: let pydicom guess the encoding, as dcmread does
        syntax = _guessed_syntax(data, meta_end)
    syntax = UID(syntax)
    body = _inflate(data[meta_end:]) if syntax == DeflatedExplicitVRLittleEndian else data[meta_end:]
    encoding = encoding_of(syntax)
    if not encoding.implicit_vr and not _starts_explicit(body, 0):
        # Some senders label an implicit VR dataset with an explicit syntax; pydicom reads it regardless.
        encoding = IMPLICIT_LE
    try:
        dataset = read_dataset(BytesIO(body), is_implicit_VR=encoding.implicit_vr,
                               is_little_endian=encoding.little_endian)
    except Exception as exc:  # pydicom raises many types for malformed streams
        raise InvalidDatasetError(f"cannot parse the dataset: {exc}") from exc
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    if problem := truncation(dataset, len(body)) or unknown_vr(dataset):
        raise InvalidDatasetError(problem)
    pixel_tag = next((tag for tag in PIXEL_TAGS if tag in dataset), None)
    pixel_element = dataset.get_item(pixel_tag) if pixel_tag is not None else None
    if pixel_element is not None and not isinstance(pixel_element, RawDataElement):
        raise InvalidDatasetError("pixel data element could not be located in the stream")
    if encoding == EXPLICIT_LE:
        header, suffix = _slice_explicit(body, pixel_element)
        # Sliced as received, so checked here: every sequence and item must hold together (lengths that
        # fit, delimiters present), or a malformed data set would be stored and served as it came.
        parse(header, EXPLICIT_LE)
        parse(suffix, EXPLICIT_LE)
    else:
        header, suffix = _transcoded(body, encoding, pixel_tag)
    return SplitDataset(dataset, syntax, file_meta, header, suffix, _spans(header),
                        pixel_element, len(data) - meta_end, encoding)


_KNOWN_VRS = frozenset(vr.value for vr in VR)


def unknown_vr(dataset: Dataset) -> str | None:
    """Why ``dataset`` is not DICOM when a top-level element of an explicit VR stream carries a VR that
    PS3.5 does not define (its length, and every element after it, would be read wrongly), else
    ``None``.  Reads the elements as parsed, without converting them (found by tests/test_fuzz.py)."""
    for element in dataset.elements():
        vr = element.VR
        if vr is not None and vr not in _KNOWN_VRS:
            return f"element {BaseTag(element.tag)} has no valid value representation"
    return None


def _meta_transfer_syntax(file_meta: bytes) -> str | None:
    """(0002,0010) Transfer Syntax UID from the file meta group's bytes, or None."""
    for tag, start, end in explicit_elements(file_meta):
        if tag == 0x00020010:
            return file_meta[start + 8 : end].rstrip(b"\0 ").decode("ascii", "replace") or None
    return None


def _guessed_syntax(data: bytes, meta_end: int) -> str:
    """The encoding of a dataset without file meta, as pydicom's reader determines it."""
    try:
        dataset = dcmread(BytesIO(data[meta_end:]), force=True, stop_before_pixels=True)
    except Exception as exc:
        raise InvalidDatasetError(f"cannot parse the dataset: {exc}") from exc
    return _transfer_syntax_of(dataset)


def _inflate(data: bytes) -> bytes:
    """A Deflated Explicit VR Little Endian dataset's bytes, inflated (PS3.5 A.5: raw deflate)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data) + inflater.flush()
    except zlib.error as exc:
        raise InvalidDatasetError(f"deflated dataset cannot be inflated: {exc}") from exc
    if not inflater.eof:
        raise InvalidDatasetError("deflated dataset is truncated")
    return inflated


def truncation(dataset: Dataset, size: int) -> str | None:
    """Describe how a dataset read by pydicom was cut short, or None when it is complete.

    pydicom reads a truncated stream without complaint: the last element keeps the bytes that are
    there, and a cut inside an element header just ends the dataset early.  So: every defined-length
    top-level value must be complete, and the last element must end where the stream ends.  Positions
    are those of the dataset's bytes (inflated, for a deflated one).
    """
    end = None
    for tag in sorted(dataset.keys()):  # keys(): iterating a Dataset would decode every element
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement):
            end = None  # decoded eagerly by pydicom (Specific Character Set): its position is unknown
            continue
        if element.length == 0xFFFFFFFF:
            end = None if element.value is None else element.value_tell + len(element.value) + 8
            continue
        available = size - element.value_tell if element.value is None else len(element.value)
        if available < element.length:
            return (f"dataset is truncated: element {BaseTag(tag)} needs {element.length} bytes, "
                    f"{max(available, 0)} remain")
        end = element.value_tell + element.length
    if end is not None and end < size:
        return f"dataset is truncated: {size - end} bytes after the last element do not form an element"
    return None


def _transfer_syntax_of(dataset: Dataset) -> str:
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax:
        return str(syntax)
    implicit, little = dataset.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _meta_start(data: bytes) -> int:
    return 132 if data[128:132] == b"DICM" else 0


def explicit_elements(data: bytes, position: int = 0, *, group: int | None = None) -> Iterator[tuple[int, int, int]]:
    """Walk top-level Explicit VR Little Endian elements: (tag, start, end) of each.

    Only for element runs without undefined lengths, such as the file meta group; stops at the end of
    ``data``, at a truncated element, or at the first element outside ``group`` when one is given.
    """
    while (header := _element_header(data, position)) is not None:
        tag, start, length = header
        if group is not None and tag >> 16 != group:
            return
        end = start + length
        yield tag, position, min(end, len(data))
        position = end


def _element_header(data: bytes, position: int) -> tuple[int, int, int] | None:
    """(tag, value start, value length) of the Explicit VR Little Endian element at ``position``, or None
    when its header is cut short.  Delimiters (FFFE,xxxx), which carry no VR, read with their 4-byte
    length's first bytes as the "VR": never a long one, so their tag is right."""
    if position + 8 > len(data):
        return None
    group, element = struct.unpack_from("<HH", data, position)
    if data[position + 4 : position + 6].decode("latin-1") in _LONG_VRS:
        if position + 12 > len(data):
            return None
        return (group << 16) | element, position + 12, struct.unpack_from("<I", data, position + 8)[0]
    return (group << 16) | element, position + 8, struct.unpack_from("<H", data, position + 6)[0]


def _file_meta_end(data: bytes) -> int:
    """Offset of the first dataset element: group 0002 is always Explicit VR Little Endian."""
    start = _meta_start(data)
    ends = [end for _, _, end in explicit_elements(data, start, group=0x0002)]
    return ends[-1] if ends else start


def _starts_explicit(data: bytes, position: int) -> bool:
    """Whether the first dataset element carries a VR: pydicom silently falls back to implicit VR
    for files whose file meta claims an explicit syntax, without saying so in ``original_encoding``.
    """
    vr = data[position + 4 : position + 6]
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _element_start(element: RawDataElement) -> int:
    """Offset of an explicit VR element's tag, from the offset of its value."""
    return element.value_tell - (12 if element.VR in _LONG_VRS else 8)


def _slice_explicit(body: bytes, pixel: RawDataElement | None) -> tuple[bytes, bytes]:
    """Header and suffix of an Explicit VR Little Endian dataset: its own bytes."""
    if pixel is None:
        return body, b""
    pixel_start = _element_start(pixel)
    value_end = pixel.value_tell + len(pixel.value or b"")
    if pixel.length == 0xFFFFFFFF:
        value_end += 8  # the Sequence Delimitation Item that closes encapsulated pixel data
    return body[:pixel_start], body[value_end:]


def _transcoded(body: bytes, encoding: Encoding, pixel_tag: int | None) -> tuple[bytes, bytes]:
    """Header and suffix of an Implicit VR or Big Endian dataset in Explicit VR Little Endian: element
    headers rewritten, value bytes as received (``transcode``)."""
    elements = parse(body, encoding)
    if encoding.implicit_vr:
        resolve_vrs(elements, pixel_representation(elements, encoding))
    index = next((i for i, element in enumerate(elements) if element.tag == pixel_tag), len(elements))
    return encode(elements[:index], encoding, EXPLICIT_LE), encode(elements[index + 1 :], encoding, EXPLICIT_LE)


def _spans(header: bytes) -> dict[str, list[int]]:
    """Byte spans in ``header`` of the PATCHABLE_TAGS it holds (undefined-length ones excepted)."""
    return {span_key(tag): [position, start + length] for tag, position, start, length
            in _top_level(header, max(PATCHABLE_TAGS)) if tag in PATCHABLE_TAGS and length != 0xFFFFFFFF}


def encode_little_endian(dataset: Dataset, *, implicit_vr: bool = False) -> bytes:
    """Encode a dataset (no file meta) as Explicit (default) or Implicit VR Little Endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit_vr
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def parse_explicit_le(data: bytes) -> Dataset:
    """Parse Explicit VR Little Endian dataset bytes (a stored header or suffix)."""
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def raw_values(dataset: Dataset, tags: Sequence[int]) -> tuple[bytes | str | None, ...] | None:
    """The undecoded values of ``tags`` in ``dataset`` (None for an absent one; as text for one pydicom
    decoded already, e.g. Specific Character Set or a UID read before), or None if one holds another kind
    of decoded value.  Equal tuples (within one transfer syntax) decode to equal values: a key for caching
    what is derived from them, which spares pydicom's per-value conversions on every instance of a series.
    """
    values: list[bytes | str | None] = []
    for tag in tags:
        element = dataset._dict.get(tag)
        value = None if element is None else element.value
        if value is None or isinstance(element, RawDataElement) or isinstance(value, str):
            values.append(value)
        elif isinstance(value, (list, MultiValue)) and all(isinstance(item, str) for item in value):
            values.append("\\".join(value))
        else:
            return None
    return tuple(values)


def instance_number(dataset: Dataset) -> int | None:
    """InstanceNumber as an integer, or None when missing or not a number."""
    try:
        value = dataset.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def slice_position(dataset: Dataset) -> float | None:
    """ImagePositionPatient[2] as a float (used only for ordering), or None."""
    try:
        position = dataset.get("ImagePositionPatient")
        return float(position[2]) if position and len(position) == 3 else None
    except (TypeError, ValueError, IndexError):
        return None


def header_identity(header: bytes) -> dict[str, object]:
    """SOP Instance UID, instance number and slice position as read from a stored header's bytes.

    A direct walk over the top-level elements up to (0020,0032) Image Position (Patient), ≈5× faster
    than pydicom reading the same elements.  A value that is missing or cannot be read is None.  The
    values need not agree with pydicom's reading: a record leaves a field out of its JSON only when
    this gives the very value the JSON would hold (``record.meta_content``), and reading applies this
    same function to the same bytes.
    """
    values = _identity_values(header)
    return {
        "sop_instance_uid": _uid(values.get(0x00080018)),
        "instance_number": _number(values.get(0x00200013), int),
        "slice_position": _number(values.get(0x00200032), float, index=2),
    }


def _top_level(data: bytes, last: int) -> Iterator[tuple[int, int, int, int]]:
    """(tag, element start, value start, value length) of the top-level Explicit VR LE elements up to tag
    ``last``; undefined-length values (length 0xFFFFFFFF) are skipped over."""
    position = 0
    while (header := _element_header(data, position)) is not None:
        tag, start, length = header
        if tag > last:
            return
        if length != 0xFFFFFFFF and start + length > len(data):
            raise ValueError("element runs past the header")
        yield tag, position, start, length
        if length == 0xFFFFFFFF:
            # an undefined-length UN holds implicit VR items (PS3.5 6.2.2)
            content = IMPLICIT_LE if data[position + 4 : position + 6] == b"UN" else EXPLICIT_LE
            position = skip_undefined(data, start, content)
        else:
            position = start + length


_ELEMENT_START = struct.Struct("<HH2sH")  # tag, VR, and the length of an element with a short VR
_LONG_LENGTH = struct.Struct("<I")
_LONG_VR_BYTES = frozenset(vr.encode("latin-1") for vr in _LONG_VRS)


def _identity_values(header: bytes) -> dict[int, bytes]:
    """The values of the :data:`_IDENTITY_TAGS` elements among the top-level elements :func:`_top_level`
    walks up to (0020,0032), read as that walk reads them, in one loop (≈3× faster: it runs for every
    record read, in the GIL of the worker that retrieves it).  A damaged or unusual header: what was found
    before the damage stays usable."""
    values: dict[int, bytes] = {}
    position, end = 0, len(header)
    try:
        while position + 8 <= end:
            group, element, vr, length = _ELEMENT_START.unpack_from(header, position)
            start = position + 8
            if vr in _LONG_VR_BYTES:
                if position + 12 > end:
                    break
                (length,) = _LONG_LENGTH.unpack_from(header, start)
                start = position + 12
            tag = group << 16 | element
            if tag > _LAST_IDENTITY_TAG:
                break
            if length == 0xFFFFFFFF:
                # an undefined-length UN holds implicit VR items (PS3.5 6.2.2)
                position = skip_undefined(header, start, IMPLICIT_LE if vr == b"UN" else EXPLICIT_LE)
                continue
            if start + length > end:
                break
            if tag in _IDENTITY_TAGS:
                values[tag] = header[start : start + length]
            position = start + length
    except (struct.error, ValueError, InvalidDatasetError):
        pass
    return values


def _uid(value: bytes | None) -> str | None:
    return None if value is None else value.rstrip(b"\0 ").decode("ascii", "replace")


def _number(value: bytes | None, kind: type, *, index: int = 0) -> object:
    """Value ``index`` of a multi-valued IS or DS string as ``kind``, or None."""
    if value is None:
        return None
    try:
        return kind(value.split(b"\\")[index].strip(b"\0 ").decode("ascii"))
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
