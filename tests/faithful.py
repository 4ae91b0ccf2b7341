"""Is a rebuilt instance faithful to its original?  Compared by bytes, element by element.

The oracle is :mod:`rawdicom`, a raw element walker independent of dcbnode.  Two comparison modes
(:func:`byte_difference`):

- **identical**: same transfer syntax in and out.  The dataset bytes after the file meta must be equal
  (a Deflated dataset is compared inflated: the deflate stream itself may be redone).
- **value bytes**: another syntax.  Same tags in the same nesting, same value bytes (Big Endian values
  swapped by VR first), same VRs where both sides are explicit, sequences and items of undefined length
  kept undefined and in order.  Only the values of group lengths (gggg,0000) may differ, and a rebuilt
  one must measure its group.  When pixels are decoded or encoded (a compressed syntax on either side),
  Pixel Data is compared as decoded arrays (:func:`pixel_difference`), and Photometric Interpretation,
  Planar Configuration and the Extended Offset Table may change (the pixel-module coercions of
  docs/conformance-statement.md).

A difference is reported with the path of the first differing element, e.g. ``(0040,0275)[0].(0008,0100)``.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import rawdicom
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import JPEGExtended12Bit, generate_uid
from rawdicom import UNDEFINED, Element, Parsed, tag_str

#: Elements a decode or encode of the pixels may change (PS3.5 8.2, A.4; the conformance statement's
#: coerced attributes): Photometric Interpretation, Planar Configuration, Extended Offset Table (+ lengths).
PIXEL_CODING = frozenset({0x00280004, 0x00280006, 0x7FE00001, 0x7FE00002})
PIXEL_DATA = rawdicom.PIXEL_DATA
SOP_CLASS, SOP_INSTANCE = 0x00080016, 0x00080018


@dataclass(frozen=True)
class Difference:
    """The first difference found: where, and what."""

    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def is_group_length(tag: int) -> bool:
    """True for a retired Group Length element (gggg,0000)."""
    return tag & 0xFFFF == 0


# --------------------------------------------------------------------------- reading


def source_bytes(source: bytes | str | Path) -> bytes:
    """The bytes of a file, or the bytes themselves."""
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def as_part10(data: bytes) -> bytes:
    """A Part-10 file: ``data`` itself, or a bare dataset (no preamble, no file meta) wrapped in a minimal
    file meta naming the syntax it is encoded in (its bytes untouched)."""
    _, syntax, dataset = rawdicom.split_part10(data)
    if data[128:132] == b"DICM":
        return data
    parsed = rawdicom.parse_dataset(dataset, syntax)
    return rawdicom.part10(dataset, syntax, rawdicom.text(parsed, SOP_CLASS) or "1.2.3",
                           rawdicom.text(parsed, SOP_INSTANCE) or "1.2.3")


def read(source: bytes | str | Path) -> Dataset:
    """Parse Part-10 bytes, a file, or a bare dataset (wrapped by :func:`as_part10`) with pydicom, without
    ``force``.  The dataset remembers the bytes it was read from, for :func:`element_differences`."""
    data = source_bytes(source)
    dataset = pydicom.dcmread(BytesIO(as_part10(data)))
    dataset._faithful_bytes = data
    return dataset


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded dataset of Part-10 bytes, after the file meta group (which names the writer)."""
    return rawdicom.split_part10(part10)[2]


# --------------------------------------------------------------------------- comparing by bytes


def byte_difference(original: Parsed, rebuilt: Parsed, *, decoded_pixels: bool | None = None,
                    skip_group_lengths: bool = False) -> Difference | None:
    """The first difference between two parsed datasets, or None (see the module docstring for the modes).

    ``decoded_pixels``: compare Pixel Data as arrays elsewhere (default: when the syntaxes differ and
    either is compressed).  ``skip_group_lengths`` (a diagnosis, not a verdict): compare value bytes,
    ignoring group lengths altogether, to see what else differs.
    """
    if original.syntax == rebuilt.syntax and not skip_group_lengths:
        if original.data == rebuilt.data:
            return None
        return _first_byte_difference(original.elements, rebuilt.elements, "") or Difference(
            "", f"dataset bytes differ ({len(original.data)} vs {len(rebuilt.data)} bytes)")
    if decoded_pixels is None:
        decoded_pixels = needs_decoded_pixels(original, rebuilt)
    values = _Values(original, rebuilt, decoded_pixels)
    values.skip_group_lengths = skip_group_lengths
    return values.compare(original.elements, rebuilt.elements, "")


def needs_decoded_pixels(original: Parsed, rebuilt: Parsed) -> bool:
    """Pixel Data is compared decoded when the pixels were decoded or encoded (a compressed syntax on
    either side), and for Big Endian: its byte order follows Bits Allocated (a 32-bit dose is swapped in
    32-bit units although its VR is OW), which pydicom, not the VR, knows."""
    syntaxes = (original.syntax, rebuilt.syntax)
    return not all(s.native for s in syntaxes) or not all(s.little for s in syntaxes)


def _first_byte_difference(a: tuple[Element, ...], b: tuple[Element, ...], prefix: str) -> Difference | None:
    for ea, eb in zip(a, b, strict=False):  # lengths compared after the common part
        path = prefix + tag_str(ea.tag)
        if ea.tag != eb.tag:
            first = min(ea.tag, eb.tag)
            return Difference(prefix + tag_str(first),
                              f"present only in the {'original' if first == ea.tag else 'rebuilt'}")
        if ea.header == eb.header and ea.value == eb.value:
            continue
        if ea.items is not None and eb.items is not None and ea.header == eb.header:
            for index, (ia, ib) in enumerate(zip(ea.items, eb.items, strict=False)):
                if ia.elements is not None and ib.elements is not None and ia.value != ib.value:
                    inner = _first_byte_difference(ia.elements, ib.elements, f"{path}[{index}].")
                    if inner is not None:
                        return inner
                if ia.length != ib.length or ia.value != ib.value:
                    return Difference(f"{path}[{index}]", "item differs")
            if len(ea.items) != len(eb.items):
                return Difference(path, f"{len(ea.items)} items != {len(eb.items)}")
        if ea.header != eb.header:
            return Difference(path, f"header {ea.header.hex()} != {eb.header.hex()}")
        return Difference(path, f"value {_show(ea.value)} != {_show(eb.value)}")
    if len(a) != len(b):
        extra = (a if len(a) > len(b) else b)[min(len(a), len(b))]
        return Difference(prefix + tag_str(extra.tag),
                          f"present only in the {'original' if len(a) > len(b) else 'rebuilt'}")
    return None


def _show(value: bytes) -> str:
    return repr(value[:48]) + ("…" if len(value) > 48 else "") + f" ({len(value)} bytes)"


def encoded_size(element: Element) -> int:
    """Bytes the element takes in its dataset, delimiters included."""
    return len(element.header) + len(element.value) + (8 if element.length == UNDEFINED else 0)


class _Values:
    """The value-bytes comparison of two datasets in different syntaxes."""

    def __init__(self, original: Parsed, rebuilt: Parsed, decoded_pixels: bool) -> None:
        self.original, self.rebuilt, self.decoded_pixels = original, rebuilt, decoded_pixels
        self.skip_group_lengths = False
        self.coded = not (original.syntax.native and rebuilt.syntax.native)  # pixels decoded or encoded

    def compare(self, a: tuple[Element, ...], b: tuple[Element, ...], prefix: str) -> Difference | None:
        by_a, by_b = {e.tag: e for e in a}, {e.tag: e for e in b}
        for tag in sorted(by_a.keys() | by_b.keys()):
            path = prefix + tag_str(tag)
            if not prefix and ((self.decoded_pixels and tag == PIXEL_DATA) or (self.coded and tag in PIXEL_CODING)):
                continue
            if self.skip_group_lengths and is_group_length(tag):
                continue
            ea, eb = by_a.get(tag), by_b.get(tag)
            if ea is None or eb is None:
                return Difference(path, f"present only in the {'original' if eb is None else 'rebuilt'}")
            if is_group_length(tag):
                found = _group_length_error(b, eb, self.rebuilt.syntax.little)
                if found:
                    return Difference(path, found)
                continue
            found = self._element(ea, eb, path)
            if found is not None:
                return found
        return None

    def _element(self, ea: Element, eb: Element, path: str) -> Difference | None:
        if ea.vr is not None and eb.vr is not None and ea.vr != eb.vr:
            return Difference(path, f"VR {ea.vr} != {eb.vr}")
        if ea.items is not None or eb.items is not None:
            return self._sequence(ea, eb, path)
        va = rawdicom.swapped_to_little(ea.value, ea.vr) if not self.original.syntax.little else ea.value
        vb = rawdicom.swapped_to_little(eb.value, eb.vr) if not self.rebuilt.syntax.little else eb.value
        if va != vb:
            return Difference(path, f"value {_show(va)} != {_show(vb)}")
        return None

    def _sequence(self, ea: Element, eb: Element, path: str) -> Difference | None:
        items_a, items_b = _items_of(ea), _items_of(eb)
        if items_a is None or items_b is None:
            return Difference(path, "a sequence on one side only")
        if (ea.length == UNDEFINED) != (eb.length == UNDEFINED):
            return Difference(path, f"sequence length {_length(ea.length)} != {_length(eb.length)}")
        if len(items_a) != len(items_b):
            return Difference(path, f"{len(items_a)} items != {len(items_b)}")
        for index, (ia, ib) in enumerate(zip(items_a, items_b, strict=True)):
            where = f"{path}[{index}]"
            if (ia.length == UNDEFINED) != (ib.length == UNDEFINED):
                return Difference(where, f"item length {_length(ia.length)} != {_length(ib.length)}")
            if ia.elements is None or ib.elements is None:
                if ia.value != ib.value:
                    return Difference(where, f"fragment {_show(ia.value)} != {_show(ib.value)}")
                continue
            found = self.compare(ia.elements, ib.elements, where + ".")
            if found is not None:
                return found
        return None


def _length(length: int) -> str:
    return "undefined" if length == UNDEFINED else "defined"


def _items_of(element: Element) -> tuple[rawdicom.Item, ...] | None:
    """The items of a sequence; a defined-length UN (or implicit) value holding Implicit VR LE items
    (PS3.5 6.2.2) is read as such."""
    if element.items is not None:
        return element.items
    if element.value[:4] != b"\xfe\xff\x00\xe0":
        return None
    try:
        return rawdicom.implicit_items(element.value)
    except rawdicom.RawError:
        return None


def _group_length_error(elements: tuple[Element, ...], group_length: Element, little: bool) -> str | None:
    """Why a rebuilt group length does not measure its group, or None."""
    if len(group_length.value) != 4:
        return f"group length of {len(group_length.value)} bytes"
    group = group_length.tag >> 16
    actual = sum(encoded_size(e) for e in elements if e.tag >> 16 == group and not is_group_length(e.tag))
    (declared,) = struct.unpack("<L" if little else ">L", group_length.value)
    return None if declared == actual else f"group length says {declared}, the group takes {actual} bytes"


# --------------------------------------------------------------------------- pixels


def decoded_pixels(part10: bytes) -> np.ndarray | None:
    """The pixel array pydicom decodes from a Part-10 file (None without pixels)."""
    dataset = read(part10)
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return None
    try:
        return dataset.pixel_array
    except RuntimeError:
        if dataset.file_meta.TransferSyntaxUID != JPEGExtended12Bit:
            raise
    # pydicom's plugins fail on some 12-bit JPEG Extended (JPEG-lossy.dcm); libjpeg-turbo 3 reads it.
    frames = [imagecodecs.jpeg8_decode(frame) for frame in
              generate_frames(dataset.PixelData, number_of_frames=int(dataset.get("NumberOfFrames") or 1))]
    return np.stack(frames) if len(frames) > 1 else frames[0]


def pixel_difference(original: bytes, rebuilt: bytes) -> Difference | None:
    """Compare the decoded pixel arrays of two Part-10 files (for a decode or encode of the pixels)."""
    a, b = decoded_pixels(original), decoded_pixels(rebuilt)
    if a is None and b is None:
        return None
    if a is not None and b is not None:  # a Big Endian file decodes to a big-endian array: same values
        a, b = (x.astype(x.dtype.newbyteorder("=")) for x in (a, b))
    if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
        return Difference(tag_str(PIXEL_DATA), f"decoded pixels differ ({_describe(a)} vs {_describe(b)})")
    return None


def _describe(array: np.ndarray | None) -> str:
    return "none" if array is None else f"{array.dtype}{list(array.shape)}"


def difference(original: bytes, rebuilt: bytes, *, skip_group_lengths: bool = False,
               reencoded_frames: bool = False) -> Difference | None:
    """The first difference between two Part-10 files (or bare datasets): bytes, then decoded pixels when
    the pixels were decoded or encoded; also checks the rebuilt file meta names its dataset.

    An original whose dataset is Implicit VR under an explicit syntax is compared as what it is (the
    rebuilt one must be encoded as its syntax says).  ``reencoded_frames``: same compressed syntax, but
    the frames encoded again: every element but Pixel Data byte-identical, the pixels decoded equal.
    """
    a, b = rawdicom.parse_part10(original, lenient=True), rawdicom.parse_part10(rebuilt)
    if reencoded_frames:
        outside = [tuple(e for e in p.elements if e.tag >> 16 != 0x7FE0) for p in (a, b)]  # Pixel Data group
        found = _first_byte_difference(outside[0], outside[1], "")
        return found or pixel_difference(as_part10(original), as_part10(rebuilt))
    found = byte_difference(a, b, skip_group_lengths=skip_group_lengths)
    if found is None and a.syntax != b.syntax and needs_decoded_pixels(a, b):
        found = pixel_difference(as_part10(original), as_part10(rebuilt))
    if found is None and rebuilt[128:132] == b"DICM":
        meta = read(rebuilt).file_meta
        if meta.MediaStorageSOPInstanceUID != rawdicom.text(b, SOP_INSTANCE):
            found = Difference("file meta", "MediaStorageSOPInstanceUID does not name the dataset's SOP instance")
    return found


# --------------------------------------------------------------------------- the helpers other tests use

#: Elements a change of transfer syntax legitimately changes, for :func:`value_differences`.
SYNTAX_DEPENDENT = PIXEL_CODING | {PIXEL_DATA, 0x7FE00008, 0x7FE00009}
#: File meta elements that describe the writer or the encoding.
WRITER_META = frozenset({0x00020000, 0x00020001, 0x00020010, 0x00020012, 0x00020013})


def element_differences(original: Dataset, rebuilt: Dataset) -> list[str]:
    """[] when ``rebuilt`` is faithful to ``original``, else what differs.

    Datasets read by :func:`read` remember their bytes: they are compared by :func:`difference` (bytes,
    first differing element).  Others (parsed elsewhere, built in memory, or passed through
    :func:`as_reencoded`) can only be compared by value (:func:`value_differences`).  The file meta
    elements that do not describe the writer must be equal too.
    """
    a, b = getattr(original, "_faithful_bytes", None), getattr(rebuilt, "_faithful_bytes", None)
    if a is None or b is None:
        return value_differences(original, rebuilt)
    found = difference(a, b)
    syntax = rawdicom.split_part10(a)[1]
    if found is not None and found.path.startswith(tag_str(PIXEL_DATA)) and syntax not in rawdicom.NATIVE \
            and syntax == rawdicom.split_part10(b)[1]:
        # Lossless input stored as HTJ2K comes back in its own syntax encoded again (issue 17): the
        # elements must still be byte-identical, the frames decode equal.
        found = difference(a, b, reencoded_frames=True)
    return ([] if found is None else [str(found)]) + _file_meta_differences(original, rebuilt)


def as_reencoded(dataset: Dataset) -> Dataset:
    """The dataset, to be compared by value only: for a test whose sending peer re-encodes what it sends
    (pynetdicom sending a Dataset, DCMTK storescu writing sequences with defined lengths), where the file's
    bytes are not the bytes the node received.  tests/test_fidelity_sweep.py proves the bytes."""
    dataset.__dict__.pop("_faithful_bytes", None)
    return dataset


def value_differences(original: Dataset, rebuilt: Dataset) -> list[str]:
    """Tags whose values differ (syntax-dependent elements and group lengths excepted), described."""
    problems = []
    tags = {t for t in (set(original.keys()) | set(rebuilt.keys())) - SYNTAX_DEPENDENT if not is_group_length(t)}
    for tag in sorted(tags):
        if tag not in original or tag not in rebuilt:
            problems.append(f"{tag} present only in {'original' if tag in original else 'rebuilt'}")
            continue
        a, b = original[tag], rebuilt[tag]
        if a.value != b.value and _implicit_bytes(a) != _implicit_bytes(b):
            problems.append(f"{tag} {a.keyword}: {a.value!r:.60} != {b.value!r:.60}")
    return problems + _file_meta_differences(original, rebuilt)


def _file_meta_differences(original: Dataset, rebuilt: Dataset) -> list[str]:
    compared = set(original.file_meta.keys()) - WRITER_META - {0x00020002, 0x00020003}
    problems = [f"file meta {tag} differs" for tag in compared
                if original.file_meta.get(tag) != rebuilt.file_meta.get(tag)]
    # The Media Storage UIDs must name the dataset's SOP class and instance (PS3.10 7.1).
    named = rebuilt.file_meta.get("MediaStorageSOPInstanceUID")
    if named is not None and named != rebuilt.SOPInstanceUID:
        problems.append("MediaStorageSOPInstanceUID does not match SOPInstanceUID")
    return problems


def _implicit_bytes(element: DataElement) -> bytes:
    """The element's value as Implicit VR Little Endian bytes: equal bytes, equal element (a VR guessed
    differently by a reader changes the decoded value, not the bytes)."""
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
