"""Read-only access to volumes written by DiCube 0.3.0 (magic ``DCMCUBES``, version 1).

DCBS descends from DiCube, and sites migrating to dcbnode hold DiCube files.  This module serves them as
DICOM Part-10 instances without importing ``dicube`` (dcbnode must not depend on it).

DiCube's layout: a 116-byte little-endian header ``<8sI13Q>`` (magic, version, then (offset, length)
pairs for the status string, the zstd-compressed DICOM-JSON metadata, the space JSON, the pixel-header
JSON, the frame-offset table and the frame-length table, then the frame count), followed by those sections
and the frames: one raw HTJ2K codestream per slice, in DiCube's order (InstanceNumber ascending by default).

DiCube has no checksums, so everything read is checked against the file size and the codestreams' own
structure, and every frame is decoded before it is served: damage raises :class:`DcbsFormatError` rather
than producing wrong pixels.  Pixels are exactly DiCube's stored values, which already have the rescale
baked in; the pixel module is described from the codestream and DiCube's pixel header, as DiCube itself
does.  Where DiCube's own reader is wrong about metadata and the file holds the truth, this reader differs
(see :meth:`DiCubeReader.get_dicom_for_frame`).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import zstandard
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless
from pydicom.valuerep import format_number_as_ds

from dcbnode.dcbs.errors import DcbsFormatError
from dcbnode.dcbs.syntaxes import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["DICUBE_MAGIC", "DICUBE_VERSION", "DiCubeReader", "is_dicube_file"]

DICUBE_MAGIC = b"DCMCUBES"
DICUBE_VERSION = 1
_HEADER = struct.Struct("<8sI13Q")
_SECTIONS = ("status", "metadata", "space", "pixel header", "frame offsets", "frame lengths")
#: Metadata is DICOM-JSON without bulk data (DiCube drops values over 10 KiB): far below this bound,
#: which only guards against decompression bombs.
_MAX_METADATA_BYTES = 512 * 1024 * 1024
_TAG_KEY = re.compile(r"^[0-9A-Fa-f]{8}$")
_DTYPES = {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16}
#: Values in stored-pixel units that DiCube's rescale baking made wrong, and nothing can recompute.
_STALE_PIXEL_VALUE_TAGS = (0x00280106, 0x00280107, 0x00280108, 0x00280109)
_PADDING_TAGS = (0x00280120, 0x00280121)  # Pixel Padding Value / Range Limit: recomputed, or dropped


def is_dicube_file(path: str | os.PathLike[str]) -> bool:
    """Return True when ``path`` is a readable file starting with DiCube's speed-format magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(DICUBE_MAGIC)) == DICUBE_MAGIC
    except OSError:
        return False


def _parse_codestream(cs: bytes) -> tuple[int, int, int, bool]:
    """Check that ``cs`` is a complete lossless single-component HTJ2K codestream.

    Returns (rows, columns, precision, signed).  DiCube 0.3.0 always writes OpenJPH reversible 5/3 HT
    codestreams; anything else (lossy, colour, Part-1 J2K) is not what it writes and is refused rather
    than labelled HTJ2K Lossless.
    """
    try:
        if cs[:4] != b"\xff\x4f\xff\x51" or cs[-2:] != b"\xff\xd9":  # SOC + SIZ ... EOC: not truncated
            raise DcbsFormatError("frame is not a complete JPEG 2000 codestream")
        (_, rsiz, xsiz, ysiz, xo, yo, _, _, _, _, csiz) = struct.unpack_from(">HHIIIIIIIIH", cs, 4)
        ssiz, xr, yr = struct.unpack_from(">BBB", cs, 42)
        pos, cod, has_cap = 2, None, False
        while True:  # walk the main header up to the first tile-part (SOT)
            marker, length = struct.unpack_from(">HH", cs, pos)
            if marker == 0xFF90:
                break
            if marker == 0xFF52:
                cod = struct.unpack_from(">BBHBBBBBB", cs, pos + 4)
            if marker == 0xFF53:  # COC could make a component irreversible; OpenJPH never writes one
                raise DcbsFormatError("per-component coding styles (COC) are not supported")
            has_cap |= marker == 0xFF50
            pos += 2 + length
    except struct.error as exc:
        raise DcbsFormatError(f"truncated JPEG 2000 main header: {exc}") from None
    if cod is None or not has_cap or not rsiz & 0x4000:
        raise DcbsFormatError("frame is not an HTJ2K (JPEG 2000 Part 15) codestream")
    if csiz != 1 or (xo, yo, xr, yr) != (0, 0, 1, 1):
        raise DcbsFormatError("only single-component, unsubsampled frames are supported")
    if cod[3] != 0 or cod[8] != 1:  # MCT off, 5/3 reversible wavelet: the conditions for lossless
        raise DcbsFormatError("frame is not a reversible (lossless) codestream")
    return ysiz, xsiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80)


def _slice_json(merged: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """Rebuild one slice's DICOM-JSON from DiCube's merged metadata.

    DiCube sorts only top-level non-shared ``Value`` lists into frame order.  Non-shared values stored
    under another key (``InlineBinary``; ``null`` when the last file read lacked the tag) and non-shared
    values inside sequences stay in the order the files were globbed, which is random: they may belong to
    another slice, so such elements (and such whole sequences) are dropped rather than misattributed.
    """
    out: dict[str, Any] = {}
    for key, entry in merged.items():
        if not (_TAG_KEY.match(key) and isinstance(entry, dict) and isinstance(entry.get("vr"), str)):
            raise DcbsFormatError(f"malformed metadata entry {key!r}")
        vr, shared = entry["vr"], entry.get("shared")
        if vr == "SQ":
            items = entry.get("Value", [])
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise DcbsFormatError(f"malformed sequence {key}")
            if all(_is_fully_shared(item) for item in items):
                # Fully shared items were identical in every slice: keep them all (DiCube keeps only the
                # first); an empty sequence also stands for one absent from some slices.
                out[key] = {"vr": vr, "Value": [_slice_json(item, index, count) for item in items]}
        elif shared is True:
            out[key] = {k: v for k, v in entry.items() if k in ("vr", "Value", "InlineBinary")}
        elif shared is False and set(entry) == {"vr", "shared", "Value"}:
            values = entry["Value"]
            if not isinstance(values, list) or len(values) != count:
                raise DcbsFormatError(f"per-slice values of {key} do not match the frame count")
            value = values[index]
            if value is not None and value != "None":  # DiCube's marker for "absent in this slice"
                out[key] = {"vr": vr, "Value": value if isinstance(value, list) else [value]}
        elif shared is not False:
            raise DcbsFormatError(f"malformed metadata entry {key}")
    return out


def _is_fully_shared(item: dict[str, Any]) -> bool:
    """Return True when no element of a merged sequence item (recursively) differs between slices."""
    for entry in item.values():
        if not isinstance(entry, dict):
            raise DcbsFormatError("malformed sequence item")
        if entry.get("vr") == "SQ":
            nested = entry.get("Value", [])
            if not isinstance(nested, list) or not all(isinstance(i, dict) and _is_fully_shared(i)
                                                       for i in nested):
                return False
        elif entry.get("shared") is not True:
            return False
    return True


def _number(value: Any, what: str) -> float:
    """Return ``value`` as a finite float, or raise DcbsFormatError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DcbsFormatError(f"pixel header {what} is not a finite number: {value!r}")
    return float(value)


def _first_number(ds: Dataset, keyword: str, default: float) -> float:
    """Return the first value of a numeric element of ``ds``, or ``default`` when absent or empty."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if value else None
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DcbsFormatError(f"{keyword} is not a number: {value!r}") from exc


class DiCubeReader:
    """Serve the slices of a DiCube 0.3.0 ``.dcbs`` volume as DICOM Part-10 bytes.

    All metadata is read and checked when the reader is opened; frames are read and decoded on demand.
    The reader is safe to share between threads (positional reads, no shared file position).

    Attributes:
        path: the volume's path.
        dicom_status: DiCube's verdict on the series when it wrote the volume ("consistent",
            "missing_spacing", ...), informative only.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` and validate its header, sections and frame tables.

        Raises:
            OSError: the file cannot be opened.
            DcbsFormatError: it is not a valid DiCube 0.3.0 speed-format volume.
        """
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()
        try:
            self._open()
        except DcbsFormatError as exc:
            self.close()
            raise DcbsFormatError(f"{self.path}: {exc}") from exc.__cause__
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        """Parse and validate everything but the frames' bytes."""
        size = os.fstat(self._fd).st_size
        head = self._read(0, _HEADER.size, size)
        magic, version, *fields = _HEADER.unpack(head)
        if magic != DICUBE_MAGIC:
            raise DcbsFormatError(f"not a DiCube speed-format volume (magic {magic!r})")
        if version != DICUBE_VERSION:
            raise DcbsFormatError(f"unsupported DiCube format version {version}")
        self._count = count = fields[-1]
        sections = dict(zip(_SECTIONS, zip(fields[0:12:2], fields[1:12:2], strict=True), strict=True))
        for name in ("frame offsets", "frame lengths"):
            if sections[name][1] != 8 * count:
                raise DcbsFormatError(f"{name} table holds {sections[name][1]} bytes for {count} frames")
        offsets = struct.unpack(f"<{count}Q", self._read(*sections["frame offsets"], size))
        lengths = struct.unpack(f"<{count}Q", self._read(*sections["frame lengths"], size))
        if 0 in lengths:
            raise DcbsFormatError("a frame is empty")
        spans = [(0, _HEADER.size, "header")]
        spans += [(o, o + n, name) for name, (o, n) in sections.items() if n]
        spans += [(o, o + n, f"frame {i}") for i, (o, n) in enumerate(zip(offsets, lengths, strict=True))]
        spans.sort()
        for (_, end, name), (start, _, nxt) in itertools.pairwise(spans):
            if start < end:
                raise DcbsFormatError(f"{nxt} overlaps {name}")
        _, end, name = max(spans, key=lambda span: span[1])
        if end > size:  # a truncated file: DiCube itself would serve a short last frame
            raise DcbsFormatError(f"{name} ends at byte {end}, past the end of the file ({size} bytes)")
        self._frames = list(zip(offsets, lengths, strict=True))

        self.dicom_status = self._text(self._read(*sections["status"], size), "status")
        if not re.fullmatch(r"[a-z_]*", self.dicom_status):  # DiCube's DicomStatus enum values
            raise DcbsFormatError(f"invalid status {self.dicom_status[:40]!r}")
        space = self._read(*sections["space"], size)
        if space:
            self._json(space, "space")
        header = self._json(self._read(*sections["pixel header"], size), "pixel header")
        if not isinstance(header, dict) or header.get("PixelDtype", "uint16") not in _DTYPES:
            raise DcbsFormatError(f"unsupported pixel header {header!r}")
        self._dtype = np.dtype(_DTYPES[header.get("PixelDtype", "uint16")])
        self._slope = _number(header.get("RescaleSlope", 1.0), "RescaleSlope")
        self._intercept = _number(header.get("RescaleIntercept", 0.0), "RescaleIntercept")
        if self._slope == 0:
            raise DcbsFormatError("pixel header RescaleSlope is zero")

        blob = self._read(*sections["metadata"], size)
        if not blob:  # made from NIfTI or bare arrays: there is no patient, study or UID to serve
            raise DcbsFormatError("volume has no DICOM metadata")
        meta = self._json(self._decompress(blob), "metadata")
        if not (isinstance(meta, dict) and isinstance(meta.get("_merged_data"), dict)):
            raise DcbsFormatError("metadata lacks _merged_data")
        if meta.get("slice_count") != count:
            raise DcbsFormatError(f"metadata describes {meta.get('slice_count')!r} slices, file has {count}")
        self._merged: dict[str, Any] = meta["_merged_data"]
        _slice_json(self._merged, 0, count)  # checks the structure (and per-slice counts) of every entry

    def _read(self, offset: int, length: int, size: int | None = None) -> bytes:
        """Read exactly ``length`` bytes at ``offset`` (checked against ``size`` when given)."""
        if size is not None and offset + length > size:
            raise DcbsFormatError(f"{length} bytes at offset {offset} lie past the end of the file ({size})")
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise DcbsFormatError(f"short read at offset {offset}: the file is truncated")
        return data

    @staticmethod
    def _text(data: bytes, what: str) -> str:
        """Decode a UTF-8 section named ``what``."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DcbsFormatError(f"{what} is not UTF-8: {exc}") from None

    @classmethod
    def _json(cls, data: bytes, what: str) -> Any:
        """Parse a UTF-8 JSON section named ``what``."""
        try:
            return json.loads(cls._text(data, what))
        except json.JSONDecodeError as exc:
            raise DcbsFormatError(f"{what} is not valid JSON: {exc}") from None

    @staticmethod
    def _decompress(blob: bytes) -> bytes:
        """Decompress the zstd metadata, refusing implausible sizes (decompression bombs)."""
        try:
            size = zstandard.frame_content_size(blob)
            if size > _MAX_METADATA_BYTES:
                raise DcbsFormatError(f"metadata claims {size} bytes uncompressed")
            return zstandard.ZstdDecompressor().decompress(blob, max_output_size=_MAX_METADATA_BYTES)
        except zstandard.ZstdError as exc:
            raise DcbsFormatError(f"metadata is not valid zstd data: {exc}") from None

    def close(self) -> None:
        """Close the file; further reads raise ValueError."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> DiCubeReader:
        """Return the reader itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the reader."""
        self.close()

    def get_frame_count(self) -> int:
        """Return the number of slices (frames) in the volume."""
        return self._count

    def get_dicom_for_frame(self, index: int, force_uncompressed: bool = False) -> bytes:
        """Return slice ``index`` (in DiCube's order) as a Part-10 file.

        By default the pixel data is DiCube's codestream, spliced as-is, encapsulated under HTJ2K Lossless
        (one fragment, with a Basic Offset Table); with ``force_uncompressed`` it is decoded into native
        Explicit VR Little Endian pixels.  Either way the pixels equal DiCube's stored values.

        The dataset is DiCube's metadata for the slice, with the pixel module restated from the codestream
        and DiCube's pixel header (rescale baked in: RescaleSlope/Intercept from the header, BitsStored =
        codestream precision).  Unlike DiCube's reader, it keeps MONOCHROME1 (DiCube did not invert the
        pixels), keeps every item of fully shared sequences, omits elements DiCube could not attribute to
        this slice (see :func:`_slice_json`), rescales or drops Pixel Padding Value/Range Limit, drops the
        smallest/largest pixel value elements, writes no Rescale elements the slice did not have unless the
        header needs them, writes them as valid (at most 16-character) DS values, and never invents UIDs.
        Output is deterministic.

        Raises:
            IndexError: ``index`` is out of range.
            DcbsFormatError: the frame or its metadata is damaged or unsupported.
        """
        if not 0 <= index < self._count:  # also refuses negative indexes, which DiCube refuses too
            raise IndexError(f"frame {index} out of range [0, {self._count})")
        try:
            return self._build(index, force_uncompressed)
        except DcbsFormatError as exc:
            raise DcbsFormatError(f"{self.path}: frame {index}: {exc}") from exc.__cause__

    def _build(self, index: int, native: bool) -> bytes:
        """Build the Part-10 bytes of one slice."""
        with self._lock:
            if self._fd < 0:
                raise ValueError("reader is closed")
            cs = self._read(*self._frames[index])
        rows, columns, precision, signed = _parse_codestream(cs)
        try:
            pixels = imagecodecs.htj2k_decode(cs)
        except Exception as exc:  # imagecodecs raises its own error types per codec
            raise DcbsFormatError(f"codestream does not decode: {exc}") from None
        if pixels.shape != (rows, columns) or pixels.dtype != self._dtype or signed != (
                self._dtype.kind == "i") or precision > 8 * self._dtype.itemsize:
            raise DcbsFormatError(f"decoded {pixels.dtype}{pixels.shape} ({precision}-bit) does not match "
                                  f"the pixel header's {self._dtype}")
        try:
            ds = Dataset.from_json(_slice_json(self._merged, index, self._count))
        except DcbsFormatError:
            raise
        except Exception as exc:  # from_json raises many types on bad values
            raise DcbsFormatError(f"metadata does not convert to a dataset: {exc}") from None
        self._set_pixel_module(ds, rows, columns, precision)
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise DcbsFormatError(f"slice has no {keyword}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if native:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
            ds.add_new(0x7FE00010, "OB" if self._dtype.itemsize == 1 else "OW",
                       data + b"\x00" * (len(data) % 2))  # pixel data must have even length
        else:
            meta.TransferSyntaxUID = HTJ2KLossless
            ds.add_new(0x7FE00010, "OB", encapsulate([cs], has_bot=True))  # pads the fragment to even
            ds["PixelData"].is_undefined_length = True
        ds.file_meta = meta
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def _set_pixel_module(self, ds: Dataset, rows: int, columns: int, precision: int) -> None:
        """Describe the stored pixels (DiCube's, rescale baked in) in ``ds``, fixing what that changed."""
        for keyword, wanted in (("Rows", rows), ("Columns", columns)):
            if ds.get(keyword) not in (None, wanted):
                raise DcbsFormatError(f"metadata {keyword} {ds.get(keyword)} but the codestream has {wanted}")
        if int(ds.get("NumberOfFrames") or 1) != 1 or int(ds.get("SamplesPerPixel") or 1) != 1:
            raise DcbsFormatError("multi-frame and colour slices are not supported")
        old_slope = _first_number(ds, "RescaleSlope", 1.0)
        old_intercept = _first_number(ds, "RescaleIntercept", 0.0)
        had_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
        # DiCube stored (stored * old_slope + old_intercept - intercept) / slope (truncated when not exact):
        # MONOCHROME1 stays right as long as that mapping is increasing.
        mono1 = ds.get("PhotometricInterpretation") == "MONOCHROME1" and old_slope > 0 and self._slope > 0
        padding = [_first_number(ds, kw, math.nan) for kw in ("PixelPaddingValue", "PixelPaddingRangeLimit")]
        for tag in (*_STALE_PIXEL_VALUE_TAGS, *_PADDING_TAGS, 0x00280006, 0x00280008, 0x7FE00010):
            ds.pop(tag, None)
        signed = self._dtype.kind == "i"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated = 8 * self._dtype.itemsize
        ds.BitsStored = precision
        ds.HighBit = precision - 1
        ds.PixelRepresentation = int(signed)
        if had_rescale or (self._slope, self._intercept) != (1.0, 0.0):
            ds.RescaleSlope = format_number_as_ds(self._slope)
            ds.RescaleIntercept = format_number_as_ds(self._intercept)
        # Padding values are in stored units: map them as DiCube mapped the pixels, keep them only when
        # the result is an exact stored value (the limit only with its padding value).
        limits = np.iinfo(self._dtype)
        for tag, value in zip(_PADDING_TAGS, padding, strict=True):
            mapped = (value * old_slope + old_intercept - self._intercept) / self._slope
            if not (mapped.is_integer() and limits.min <= mapped <= limits.max):
                break
            ds.add_new(tag, "SS" if signed else "US", int(mapped))
