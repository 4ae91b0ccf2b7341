"""Encode one received DICOM instance into a DCBS instance record.

``encode_instance`` is the single entry point used by the library (``load_from_dicom_folder``), the
node's C-STORE SCP and ``dcbnode-admin import``: one code path for every way data comes in.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian

from .dataset_split import SplitDataset, instance_number, raw_values, slice_position, split_dataset
from .dictionary import FAST_ZSTD_LEVEL, SharedDictionary, codestream_header, pack_dictionary, strip_codestream
from .errors import (
    CorruptRecordError,
    InvalidDatasetError,
    UndecodablePixelDataError,
    UnsupportedTransferSyntaxError,
)
from .pixels import (
    encode_htj2k_verified,
    htj2k_eligible,
    htj2k_from_native,
    htj2k_output_photometric,
    native_dtype,
    swap_native_bytes,
    uses_colour_transform,
    zstd_compress,
)
from .record import Codec, ImageInfo, InstanceBlobs, InstanceMeta, PixelSource, frame_table, meta_content
from .stored import StoredInstance
from .syntaxes import HTJ2K_LOSSLESS_SYNTAXES, TRANSCODED_LOSSLESS_SYNTAXES, is_lossy_syntax, is_storable_syntax

log = logging.getLogger(__name__)

#: PS3.5 9.1 as hospitals meet it: digits and dots, no empty component, at most 64 characters.
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_ITEM_TAG = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True, slots=True)
class EncodedInstance:
    """A received instance, ready to append to a volume."""

    meta: InstanceMeta
    blobs: InstanceBlobs
    frames: list[bytes]
    #: the parsed received dataset (for the index's attributes); None for a record re-encoded from a volume
    dataset: Dataset | None

    def record(self, dictionary: SharedDictionary) -> tuple[bytes, list[bytes]]:
        """The metadata block (COMPACT layout) and frame data of this record, written with ``dictionary``
        (checked to read back)."""
        meta, frames = self._stored(dictionary.codestream_header)
        content = meta_content(meta, self.blobs)
        # A record with raw frames is rewritten when compaction compresses it: no need to squeeze it now.
        block = dictionary.compress(content, **({"level": FAST_ZSTD_LEVEL} if has_raw_frames(meta) else {}))
        return block, frames

    def dictionary_candidate(self) -> bytes:
        """The dictionary record a volume gets when this is its first instance (see ``dictionary.py``)."""
        header = next((codestream_header(data) for entry, data in zip(self.meta.frames, self.frames, strict=True)
                       if entry.codec == Codec.HTJ2K), b"")
        meta, _ = self._stored(header)
        return pack_dictionary(meta_content(meta, self.blobs), header)

    def _stored(self, header: bytes) -> tuple[InstanceMeta, list[bytes]]:
        """Metadata and frames as stored: HTJ2K frames without the shared ``header`` where it fits."""
        frames: list[tuple[str, bytes]] = []
        crcs: list[int | None] = []
        for entry, data in zip(self.meta.frames, self.frames, strict=True):
            body = strip_codestream(header, data) if entry.codec == Codec.HTJ2K else None
            frames.append((entry.codec, data) if body is None else (Codec.HTJ2K_SHARED, body))
            crcs.append(entry.crc if body is None else None)  # unchanged bytes: checksummed already
        return replace(self.meta, frames=frame_table(frames, crcs)), [data for _, data in frames]

    @property
    def stored_length(self) -> int:
        """Bytes of frame data (the metadata block adds a few KiB)."""
        return sum(len(frame) for frame in self.frames)


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid UID (digits and dots, ≤ 64 characters)."""
    return isinstance(value, str) and len(value) <= 64 and _UID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ParsedInstance:
    """A received instance parsed and checked, pixels not yet encoded.

    Parsing is cheap next to encoding: the archive looks the SOP Instance UID up between the two, so
    a duplicate that will be discarded costs no compression.
    """

    split: SplitDataset
    uids: dict[str, str]

    @property
    def sop_instance_uid(self) -> str:
        """The instance's SOP Instance UID (validated)."""
        return self.uids["SOPInstanceUID"]

    def encode(self, *, defer_compression: bool = False) -> EncodedInstance:
        """Encode the pixels (verified lossless) and build the record.

        ``defer_compression`` keeps native frames as they came (codec ``raw``): the node's fast path,
        whose volumes compaction compresses later (:func:`reencoded`).  Compressed input is handled
        the same either way.
        """
        split, uids = self.split, self.uids
        image, frames, extra = _encode_pixels(split, defer_compression)
        meta = InstanceMeta(
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            instance_number=instance_number(split.dataset),
            slice_position=slice_position(split.dataset),
            received_syntax=str(split.transfer_syntax),
            received_length=split.received_length,
            spans=split.spans,
            image=image,
            frames=frame_table(frames),
        )
        blobs = InstanceBlobs(header=split.header, suffix=split.suffix, file_meta=split.file_meta, **extra)
        return EncodedInstance(meta, blobs, [data for _, data in frames], split.dataset)


def parse_instance(data: bytes | memoryview, *, transfer_syntax: str | None = None,
                   file_meta: bytes | None = None) -> ParsedInstance:
    """Parse Part-10 bytes (or a dataset as received, with its ``transfer_syntax`` and the ``file_meta``
    to keep) and check what storing requires: a supported syntax and valid UIDs.

    Raises :class:`InvalidDatasetError` (or a subclass) with a reason fit for a DICOM Error Comment.
    """
    split = split_dataset(data, transfer_syntax=transfer_syntax, file_meta=file_meta)
    if not is_storable_syntax(split.transfer_syntax):
        raise UnsupportedTransferSyntaxError(f"transfer syntax {split.transfer_syntax} is not supported")
    return ParsedInstance(split, _required_uids(split.dataset))


def encode_instance(source: bytes | str | Path, *, transfer_syntax: str | None = None) -> EncodedInstance:
    """Encode Part-10 bytes or a Part-10 file into a record, verifying lossless storage.

    Raises :class:`InvalidDatasetError` (or a subclass) with a reason fit for a DICOM Error Comment when
    the input cannot be stored faithfully; for a file, the error names it.
    """
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidDatasetError(f"cannot read file: {exc.strerror}", source=source) from exc
        try:
            return encode_instance(data, transfer_syntax=transfer_syntax)
        except InvalidDatasetError as exc:
            raise type(exc)(exc.reason, source=source) from exc
    return parse_instance(source, transfer_syntax=transfer_syntax).encode()


def _required_uids(dataset: Dataset) -> dict[str, str]:
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = dataset.get(keyword)
        except Exception as exc:
            raise InvalidDatasetError(f"{keyword} is unreadable: {exc}") from exc
        if value is None or value == "":
            raise InvalidDatasetError(f"{keyword} is missing")
        if not is_valid_uid(str(value)):
            raise InvalidDatasetError(f"{keyword} is not a valid UID")
        uids[keyword] = str(value)
    return uids


def _image_attribute(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = dataset.get(keyword, default)
        if value is None or value == "":
            raise InvalidDatasetError(f"{keyword} is missing for pixel data")
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidDatasetError(f"{keyword} is not a number") from exc


#: The attributes :func:`_base_image_info` and the expected Pixel Data length are derived from.
_IMAGE_TAGS = tuple(Tag(keyword) for keyword in (
    "NumberOfFrames", "PhotometricInterpretation", "SamplesPerPixel", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PlanarConfiguration"))
_IMAGE_CACHE_SIZE = 256
_image_cache: dict[tuple, tuple[ImageInfo, int]] = {}
_image_cache_lock = threading.Lock()


def _image_info(split: SplitDataset, pixel: RawDataElement) -> tuple[ImageInfo, int]:
    """:func:`_base_image_info` and the length native Pixel Data must have, reused for the next instance
    whose attributes are byte for byte the same (the slices of a series nearly always are)."""
    raw = raw_values(split.dataset, _IMAGE_TAGS)
    key = None if raw is None else (*raw, str(split.transfer_syntax), int(pixel.tag), pixel.VR,
                                    pixel.length == 0xFFFFFFFF)
    with _image_cache_lock:
        cached = _image_cache.get(key) if key is not None else None
    if cached is not None:
        return cached
    image = _base_image_info(split, pixel)
    if image.rows < 1 or image.columns < 1:
        raise InvalidDatasetError("Rows and Columns must be positive for pixel data")
    # Native data only: encapsulated data has no length its attributes require.
    result = image, 0 if pixel.length == 0xFFFFFFFF else _expected_length(split.dataset)
    if key is not None:
        with _image_cache_lock:
            if len(_image_cache) >= _IMAGE_CACHE_SIZE:
                _image_cache.clear()
            _image_cache[key] = result
    return result


def _base_image_info(split: SplitDataset, pixel: RawDataElement) -> ImageInfo:
    dataset = split.dataset
    frames = _image_attribute(dataset, "NumberOfFrames", 1)
    if frames < 1:
        raise InvalidDatasetError(f"NumberOfFrames is {frames}")
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").strip()
    samples = _image_attribute(dataset, "SamplesPerPixel", 1)
    return ImageInfo(
        rows=_image_attribute(dataset, "Rows"),
        columns=_image_attribute(dataset, "Columns"),
        samples_per_pixel=samples,
        bits_allocated=_image_attribute(dataset, "BitsAllocated"),
        bits_stored=_image_attribute(dataset, "BitsStored", dataset.get("BitsAllocated")),
        pixel_representation=_image_attribute(dataset, "PixelRepresentation", 0),
        number_of_frames=frames,
        planar_configuration=_image_attribute(dataset, "PlanarConfiguration", 0) if samples > 1 else None,
        photometric=photometric,
        native_photometric=photometric,
        htj2k_photometric=None,
        pixel_tag=int(pixel.tag),
        pixel_vr=_pixel_vr(pixel, dataset),
        source=PixelSource.NATIVE,
    )


def _pixel_vr(pixel: RawDataElement, dataset: Dataset) -> str:
    """The pixel data VR; implicit VR input leaves it ambiguous, PS3.5 A.1 and A.4 settle it."""
    if pixel.VR in ("OB", "OW", "OF", "OD"):
        return pixel.VR
    if pixel.tag != 0x7FE00010:
        return "OF" if pixel.tag == 0x7FE00008 else "OD"
    if pixel.length == 0xFFFFFFFF:
        return "OB"
    return "OW" if int(dataset.get("BitsAllocated", 16) or 16) > 8 else "OB"


def _encode_pixels(
    split: SplitDataset, defer_compression: bool
) -> tuple[ImageInfo | None, list[tuple[str, bytes]], dict[str, bytes]]:
    pixel = split.pixel_element
    if pixel is None:
        return None, [], {}
    image, expected_length = _image_info(split, pixel)
    if pixel.length == 0xFFFFFFFF:
        return _encode_encapsulated(split, image, pixel.value or b"")
    return _encode_native(split, image, pixel.value or b"", expected_length, defer_compression)


# -- native pixel data ----------------------------------------------------------------------------------


def _encode_native(
    split: SplitDataset, image: ImageInfo, value: bytes, expected: int, defer_compression: bool
) -> tuple[ImageInfo, list[tuple[str, bytes]], dict[str, bytes]]:
    dtype = native_dtype(image.bits_allocated, image.pixel_representation, image.pixel_tag)
    if split.transfer_syntax == ExplicitVRBigEndian:
        value = swap_native_bytes(value, image.bits_allocated, image.pixel_vr)
    _check_length(value, expected)
    if dtype is None:  # 1-bit: frames are not byte aligned, keep the whole value as one blob
        return replace(image, packed=True), [(Codec.ZSTD, zstd_compress(value))], {}
    frame_length = expected // image.number_of_frames
    # A whole-value slice of bytes is the value itself: a single frame is not copied.
    received = [value[index * frame_length : (index + 1) * frame_length] for index in range(image.number_of_frames)]
    tail = value[frame_length * image.number_of_frames :]
    if defer_compression:  # HTJ2K output, if offered, is encoded when asked for (rebuild.py)
        image = replace(image, htj2k_photometric=htj2k_output_photometric(image))
        return image, [(Codec.RAW, frame) for frame in received], {"native_tail": tail}
    frames, htj2k_photometric = compress_native_frames(image, received)
    return replace(image, htj2k_photometric=htj2k_photometric), frames, {"native_tail": tail}


def compress_native_frames(
    image: ImageInfo, frames: list[bytes]
) -> tuple[list[tuple[str, bytes]], str | None]:
    """Each native frame as verified-lossless HTJ2K where it can be, else as zstd; and the photometric
    interpretation of HTJ2K output (None unless every frame is HTJ2K)."""
    compressed: list[tuple[str, bytes]] = []
    for frame in frames:
        codestream = htj2k_from_native(frame, image)
        compressed.append((Codec.ZSTD, zstd_compress(frame)) if codestream is None else (Codec.HTJ2K, codestream))
    all_htj2k = all(codec == Codec.HTJ2K for codec, _ in compressed)
    return compressed, htj2k_output_photometric(image) if all_htj2k else None


def reencoded(stored: StoredInstance) -> EncodedInstance:
    """A stored record's instance as an inline store encodes it, for compaction to write anew: raw frames
    compressed (verified lossless), ``htj2k-shared`` frames whole again (the new volume's dictionary
    decides what is shared).  Frames are read, and so checked against their CRCs, on the way."""
    meta, image = stored.meta, stored.meta.image
    data = list(stored.iter_frames())
    codecs = [Codec.HTJ2K if entry.codec == Codec.HTJ2K_SHARED else entry.codec for entry in meta.frames]
    if Codec.RAW in codecs:
        if image is None or any(codec != Codec.RAW for codec in codecs):
            raise CorruptRecordError(stored.volume.path, stored.location.offset,
                                     "raw frames in a record that is not all raw native frames")
        frames, htj2k_photometric = compress_native_frames(image, data)
        meta = replace(meta, image=replace(image, htj2k_photometric=htj2k_photometric))
    else:
        frames = list(zip(codecs, data, strict=True))
    return EncodedInstance(replace(meta, frames=frame_table(frames)), stored.blobs, [d for _, d in frames], None)


def has_raw_frames(meta: InstanceMeta) -> bool:
    """Whether a record still holds frames whose compression was deferred."""
    return any(entry.codec == Codec.RAW for entry in meta.frames)


def _expected_length(dataset: Dataset) -> int:
    try:
        return get_expected_length(dataset, unit="bytes")
    except Exception as exc:
        raise InvalidDatasetError(f"Image Pixel attributes are inconsistent: {exc}") from exc


def _check_length(value: bytes, expected: int) -> None:
    if len(value) < expected:
        raise InvalidDatasetError(f"Pixel Data has {len(value)} bytes, its attributes require {expected}")


# -- encapsulated pixel data ----------------------------------------------------------------------------


def _encode_encapsulated(
    split: SplitDataset, image: ImageInfo, value: bytes
) -> tuple[ImageInfo, list[tuple[str, bytes]], dict[str, bytes]]:
    basic_offsets, fragmented = _split_fragments(split.dataset, image, value)
    syntax = split.transfer_syntax
    codestreams = [b"".join(fragments) for fragments in fragmented]
    original = replace(image, source=PixelSource.ORIGINAL,
                       fragments=[[len(f) for f in fragments] for fragments in fragmented])
    extra = {"basic_offsets": basic_offsets}
    keep = [(Codec.ORIGINAL, codestream) for codestream in codestreams]
    try:
        if is_lossy_syntax(syntax):
            decoded_photometric = _check_decodable(split.dataset, syntax, raw=False)
            return replace(original, native_photometric=decoded_photometric), keep, extra
        if syntax in HTJ2K_LOSSLESS_SYNTAXES:
            return _keep_htj2k(split, image, original, codestreams, keep, extra)
        if syntax in TRANSCODED_LOSSLESS_SYNTAXES:
            return _transcode(split, image, original, keep, extra)
    except UndecodablePixelDataError as exc:
        # Taken as sent, as an archive must: the codestreams are kept byte for byte (checksummed, never
        # re-encoded) and served in their own syntax only, since no pixel of them can be checked.
        log.warning("%s: %s; stored as received, served in %s only", split.dataset.get("SOPInstanceUID", "?"),
                    exc.reason, syntax.name)
        return replace(original, decodable=False), keep, extra
    raise UnsupportedTransferSyntaxError(f"transfer syntax {syntax} is not supported")


def _split_fragments(dataset: Dataset, image: ImageInfo, value: bytes) -> tuple[bytes, list[tuple[bytes, ...]]]:
    """The Basic Offset Table and each frame's fragments, checked to cover the value exactly."""
    if value[:4] != _ITEM_TAG:
        raise InvalidDatasetError("encapsulated Pixel Data does not start with a Basic Offset Table item")
    table_length = int.from_bytes(value[4:8], "little")
    basic_offsets = value[8 : 8 + table_length]
    extended = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        extended = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    try:
        fragmented = list(generate_fragmented_frames(value, number_of_frames=image.number_of_frames,
                                                     extended_offsets=extended))
    except Exception as exc:
        raise InvalidDatasetError(f"encapsulated Pixel Data is malformed: {exc}") from exc
    if len(fragmented) != image.number_of_frames:
        raise InvalidDatasetError(
            f"encapsulated Pixel Data holds {len(fragmented)} frames, NumberOfFrames says {image.number_of_frames}")
    covered = 8 + table_length + sum(8 + len(f) for fragments in fragmented for f in fragments)
    if covered != len(value):
        raise InvalidDatasetError("encapsulated Pixel Data has bytes outside its fragments")
    return basic_offsets, fragmented


def _decoded_frames(dataset: Dataset, syntax: str, *, raw: bool) -> Iterator[tuple[np.ndarray, dict]]:
    """Decode frame by frame with pydicom's decoder registry (GDCM, pylibjpeg).

    ``as_array`` per index rather than ``iter_array``: the latter fails outright on some files
    (a read-only output buffer with the GDCM plugin) that ``as_array`` decodes.
    """
    decoder = get_decoder(syntax)
    frames = _image_attribute(dataset, "NumberOfFrames", 1)
    for index in range(frames):
        try:
            yield decoder.as_array(dataset, index=index, raw=raw)
        except Exception as exc:  # every decoding plugin raises its own types
            raise UndecodablePixelDataError(f"compressed frame {index} cannot be decoded: {exc}") from exc


def _check_decodable(dataset: Dataset, syntax: str, *, raw: bool) -> str:
    """Decode every frame once; return the photometric interpretation of the decoded pixels."""
    photometric = ""
    for _, info in _decoded_frames(dataset, syntax, raw=raw):
        photometric = str(info.get("photometric_interpretation", ""))
    return photometric


def _keep_htj2k(split, image, original, codestreams, keep, extra):
    """HTJ2K lossless input: keep its codestreams when our decoder agrees with pydicom's."""
    frames = []
    photometric = image.photometric
    for codestream, (array, info) in zip(codestreams, _decoded_frames(split.dataset, split.transfer_syntax,
                                                                      raw=True), strict=True):
        photometric = str(info.get("photometric_interpretation", photometric))
        import imagecodecs

        ours = imagecodecs.htj2k_decode(codestream)
        if ours.shape != array.shape or not np.array_equal(ours, array):
            return replace(original, native_photometric=photometric), keep, extra
        frames.append((Codec.HTJ2K, codestream))
    # The fragments and Basic Offset Table are kept too: in its own syntax the instance comes back as sent.
    info = replace(image, source=PixelSource.HTJ2K, native_photometric=photometric,
                   htj2k_photometric=image.photometric, fragments=original.fragments)
    return info, frames, extra


def _transcode(split, image, original, keep, extra):
    """Lossless legacy input: decode, re-encode as HTJ2K lossless, verify; else keep the original."""
    frames = []
    photometric = image.photometric
    for array, info in _decoded_frames(split.dataset, split.transfer_syntax, raw=True):
        photometric = str(info.get("photometric_interpretation", photometric))
        colour_transform = uses_colour_transform(image.samples_per_pixel, photometric)
        codestream = None
        if htj2k_eligible(array.dtype, image.samples_per_pixel, photometric):
            codestream = encode_htj2k_verified(array, colour_transform)
        if codestream is None:
            return replace(original, native_photometric=photometric), keep, extra
        frames.append((Codec.HTJ2K, codestream))
    htj2k_photometric = "YBR_RCT" if uses_colour_transform(image.samples_per_pixel, photometric) else photometric
    info = replace(image, source=PixelSource.TRANSCODED, native_photometric=photometric,
                   htj2k_photometric=htj2k_photometric, planar_configuration=0 if image.samples_per_pixel > 1
                   else None)
    return info, frames, extra  # the received Basic Offset Table: re-encoded output fills one only if it had one
