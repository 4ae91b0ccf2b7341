"""What an instance record holds, and how its metadata block is laid out.

An instance record's payload is a metadata block followed by the frame data.  The metadata *content*
is ``u32 json_length``, a UTF-8 JSON object (:class:`InstanceMeta`), then the binary blobs the JSON
describes: the dataset header, the original file meta, and a few small byte strings needed to rebuild
the original Pixel Data element exactly.  Records are written in the COMPACT layout (the content in
one zstd frame using the volume dictionary, ``dictionary.py``); records of the older JSON layout (the
content itself, with only the header blob zstd-compressed) are still read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields, replace

import zstandard

from .dataset_split import header_identity
from .format import crc32

_JSON_LENGTH = struct.Struct("<I")


class Codec:
    """Names of the per-frame codecs (the ``codec`` field of a frame entry)."""

    HTJ2K = "htj2k"  #: HTJ2K lossless codestream of the stored values
    #: the same codestream stored without the main header and tile-part header the volume dictionary holds
    HTJ2K_SHARED = "htj2k-shared"
    ZSTD = "zstd"  #: zstd of the native little-endian frame bytes
    #: the native little-endian frame bytes as received, uncompressed: what the node writes at ingest when
    #: compression is deferred; compaction turns such frames into HTJ2K (or zstd) later
    RAW = "raw"
    ORIGINAL = "original"  #: the original (lossy) encapsulated fragments, concatenated, byte for byte


class PixelSource:
    """How the stored frames relate to what was received."""

    NATIVE = "native"  #: received uncompressed
    TRANSCODED = "transcoded"  #: received in a lossless compressed syntax, decoded, verified
    HTJ2K = "htj2k"  #: received as HTJ2K lossless: codestreams kept as they came
    ORIGINAL = "original"  #: received lossy: codestreams kept as they came


@dataclass(frozen=True, slots=True)
class FrameEntry:
    """One stored frame: ``offset`` is relative to the end of the metadata block."""

    offset: int
    length: int
    crc: int
    codec: str


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """The Image Pixel attributes and where the pixels came from.

    ``photometric`` is the value in the stored header; ``native_photometric`` the one that describes
    decoded (native) pixels; ``htj2k_photometric`` the one for HTJ2K output (YBR_RCT when the colour
    transform was used), or None when the frames cannot be served as HTJ2K.
    """

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    number_of_frames: int
    planar_configuration: int | None
    photometric: str
    native_photometric: str
    htj2k_photometric: str | None
    pixel_tag: int
    pixel_vr: str
    source: str
    #: original fragment lengths per frame, to rebuild encapsulated Pixel Data byte for byte
    fragments: list[list[int]] | None = None
    #: frames hold the whole Pixel Data value as one zstd blob (1-bit data is not byte aligned per frame)
    packed: bool = False
    #: False for compressed frames no installed decoder reads: kept as received, served only as received
    decodable: bool = True


@dataclass(frozen=True, slots=True)
class InstanceMeta:
    """Everything about an instance except its frame data."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    instance_number: int | None
    slice_position: float | None
    received_syntax: str
    received_length: int
    #: [start, end) of top-level header elements that some output forms replace, by "ggggeeee" key
    spans: dict[str, list[int]]
    image: ImageInfo | None
    frames: list[FrameEntry] = field(default_factory=list)
    blob_lengths: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstanceBlobs:
    """The binary parts of the metadata block, uncompressed."""

    #: dataset elements before the pixel data element, Explicit VR Little Endian
    header: bytes
    #: dataset elements after the pixel data element, Explicit VR Little Endian
    suffix: bytes = b""
    #: the received file meta group (without preamble), as received
    file_meta: bytes = b""
    #: the original Basic Offset Table item value (encapsulated input kept as original)
    basic_offsets: bytes = b""
    #: bytes of a native Pixel Data value beyond the last frame (padding, trailing junk), kept verbatim
    native_tail: bytes = b""


_BLOB_ORDER = ("header", "suffix", "file_meta", "basic_offsets", "native_tail")
#: JSON fields a COMPACT record omits when its header blob gives the same value (``header_identity``)
_DERIVED = ("sop_instance_uid", "instance_number", "slice_position")


def meta_content(meta: InstanceMeta, blobs: InstanceBlobs) -> bytes:
    """The metadata content of a COMPACT record: JSON and blobs, all uncompressed.

    The JSON leaves out each identity field (:data:`_DERIVED`) the header blob gives back equal, so
    that the varying values are stored once (≈13 bytes per record after compression).
    """
    derived = header_identity(blobs.header)
    # repr, not ==: 0.0 == -0.0 and 1 == 1.0, but the JSON must come back as it would have been written
    omit = {key for key in _DERIVED if derived[key] is not None and repr(derived[key]) == repr(getattr(meta, key))}
    return _pack(meta, {name: getattr(blobs, name) for name in _BLOB_ORDER}, omit)


def unpack_content(content: bytes) -> tuple[InstanceMeta, InstanceBlobs]:
    """Decode the metadata content of a COMPACT record; raises ``ValueError`` if malformed."""
    return _unpack(content, derive=True)


def unpack_meta(block: bytes) -> tuple[InstanceMeta, InstanceBlobs]:
    """Decode a metadata block of the JSON layout (header blob zstd-compressed); ``ValueError`` if malformed."""
    meta, blobs = _unpack(block)
    return meta, replace(blobs, header=zstandard.ZstdDecompressor().decompress(blobs.header))


def _pack(meta: InstanceMeta, values: dict[str, bytes], omit: set[str]) -> bytes:
    lengths = {name: len(values[name]) for name in _BLOB_ORDER}
    document = {key: value for key, value in asdict(meta).items() if key not in omit}
    document["blob_lengths"] = lengths
    encoded = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    return b"".join([_JSON_LENGTH.pack(len(encoded)), encoded, *(values[name] for name in _BLOB_ORDER)])


def _unpack(block: bytes, *, derive: bool = False) -> tuple[InstanceMeta, InstanceBlobs]:
    if len(block) < _JSON_LENGTH.size:
        raise ValueError("metadata block too short")
    (json_length,) = _JSON_LENGTH.unpack_from(block)
    start = _JSON_LENGTH.size
    document = json.loads(block[start : start + json_length])
    _check_known(document, InstanceMeta)
    image = document.pop("image")
    if image:
        _check_known(image, ImageInfo)
    frames = [FrameEntry(**entry) for entry in document.pop("frames")]
    position = start + json_length
    if derive and any(key not in document for key in _DERIVED):
        header = block[position : position + document["blob_lengths"].get("header", 0)]
        document = header_identity(header) | document
    meta = InstanceMeta(**document, image=ImageInfo(**image) if image else None, frames=frames)
    values: dict[str, bytes] = {}
    for name in _BLOB_ORDER:
        length = meta.blob_lengths.get(name, 0)
        values[name] = block[position : position + length]
        position += length
    if position != len(block):
        raise ValueError("metadata block length does not match its blobs")
    return meta, InstanceBlobs(**values)


class NewerRecordError(ValueError):
    """A record holds fields this code does not know: a newer dcbnode wrote it."""


def _check_known(document: dict, kind: type) -> None:
    unknown = set(document) - {item.name for item in fields(kind)}
    if unknown:
        raise NewerRecordError(f"written by a newer dcbnode (fields {', '.join(sorted(unknown))}); "
                               "upgrade dcbnode to read it")


def frame_table(frames: list[tuple[str, bytes]], known_crcs: list[int | None] | None = None) -> list[FrameEntry]:
    """Lay out ``(codec, data)`` frames one after the other and checksum each (``known_crcs``: checksums
    the caller has already, None where it has not; a 512² frame takes ≈0.3 ms)."""
    entries = []
    offset = 0
    for index, (codec, data) in enumerate(frames):
        crc = known_crcs[index] if known_crcs is not None else None
        entries.append(FrameEntry(offset, len(data), crc32(data) if crc is None else crc, codec))
        offset += len(data)
    return entries


def pack_tombstone(sop_instance_uid: str, series_instance_uid: str, deleted_at: str) -> bytes:
    """Metadata block of a tombstone record: the instance is deleted from this volume."""
    return json.dumps({"sop_instance_uid": sop_instance_uid, "series_instance_uid": series_instance_uid,
                       "deleted_at": deleted_at}, sort_keys=True).encode()


def unpack_tombstone(block: bytes) -> dict[str, str]:
    """Decode a tombstone metadata block."""
    return json.loads(block)
