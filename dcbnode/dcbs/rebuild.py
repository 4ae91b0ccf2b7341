"""Rebuild a standard DICOM instance from a stored record.

Three forms (PS3.5 transfer syntaxes):

* HTJ2K — the stored codestreams spliced into encapsulated Pixel Data with a Basic Offset Table, one
  fragment per frame; no pixel is decoded;
* native — Explicit or Implicit VR Little Endian, frames decoded bit-exact;
* original — the received lossy syntax, its Pixel Data rebuilt byte for byte.

The header is the stored Explicit VR Little Endian bytes, with at most a few top-level elements
replaced (Photometric Interpretation, Planar Configuration) or dropped (the Extended Offset Table,
whose offsets no longer hold).  Output is deterministic.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from pydicom.uid import HTJ2K, UID, ExplicitVRLittleEndian, HTJ2KLossless, ImplicitVRLittleEndian

from .dataset_split import encode_little_endian, explicit_elements, parse_explicit_le, span_key
from .errors import DcbsError
from .file_meta import even, file_meta_group, writer_elements
from .pixels import decode_frame, htj2k_from_native, native_frame_bytes, zstd_decompress
from .record import Codec, ImageInfo, InstanceBlobs, InstanceMeta, PixelSource

_ITEM = 0xE000FFFE.to_bytes(4, "little")
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PREAMBLE = b"\0" * 128 + b"DICM"
_HTJ2K_OUTPUTS = (HTJ2KLossless, HTJ2K)
#: File meta elements describing the writer or the encoding: always dcbnode's own.
_REPLACED_META = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012,
                            0x00020013})

_Buffer = bytes | memoryview  #: part of a rebuilt instance, joined into its bytes once at the end
FrameSource = Callable[[int], bytes]


class UnavailableSyntaxError(DcbsError):
    """The instance cannot be rebuilt in the requested transfer syntax."""


@dataclass(frozen=True, slots=True)
class RebuiltInstance:
    """A rebuilt instance: its file meta group and its dataset, ready to write or send."""

    transfer_syntax: UID
    file_meta: bytes  #: group 0002, without preamble
    dataset: bytes

    def part10(self) -> bytes:
        """The complete Part-10 file."""
        return b"".join((_PREAMBLE, self.file_meta, self.dataset))


def available_syntaxes(meta: InstanceMeta) -> list[UID]:
    """Transfer syntaxes this instance can be rebuilt in, cheapest first."""
    image = meta.image
    if image is None:
        return [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    syntaxes: list[UID] = []
    if image.htj2k_photometric is not None:
        syntaxes.extend(_HTJ2K_OUTPUTS)
    if image.source == PixelSource.ORIGINAL:
        syntaxes.append(UID(meta.received_syntax))
    syntaxes.extend([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return syntaxes


def rebuild(meta: InstanceMeta, blobs: InstanceBlobs, frames: FrameSource, syntax: str) -> RebuiltInstance:
    """Rebuild the instance in ``syntax``; ``frames(i)`` returns the stored bytes of frame ``i``."""
    syntax = UID(syntax)
    if syntax not in available_syntaxes(meta):
        raise UnavailableSyntaxError(f"instance {meta.sop_instance_uid} cannot be rebuilt as {syntax}")
    image = meta.image
    if image is None:
        dataset = _encode(blobs.header, (), blobs.suffix, syntax)
    elif syntax in _HTJ2K_OUTPUTS:
        header = _patch(blobs.header, meta, image.htj2k_photometric, 0)
        dataset = _encode(header, _encapsulated(image, b"", _htj2k_frames(frames, meta), None), blobs.suffix, syntax)
    elif syntax == meta.received_syntax and image.source == PixelSource.ORIGINAL:
        pixel = _encapsulated(image, blobs.basic_offsets, _each(frames, meta), image.fragments)
        dataset = _encode(blobs.header, pixel, blobs.suffix, syntax)
    else:
        planar = image.planar_configuration if image.source == PixelSource.NATIVE else 0
        header = _patch(blobs.header, meta, image.native_photometric, planar)
        tag, vr, value = _native_pixels(meta, blobs, frames, planar)
        dataset = _encode(header, _native_element(tag, vr, value, syntax), blobs.suffix, syntax)
    return RebuiltInstance(syntax, _file_meta(meta, blobs, syntax), dataset)


def _each(frames: FrameSource, meta: InstanceMeta) -> Iterable[bytes]:
    return (frames(index) for index in range(len(meta.frames)))


def _htj2k_frames(frames: FrameSource, meta: InstanceMeta) -> Iterator[bytes]:
    """The HTJ2K codestreams of the frames; raw frames (compression deferred) are encoded now, verified."""
    assert meta.image is not None
    for index, entry in enumerate(meta.frames):
        data = frames(index)
        if entry.codec == Codec.RAW:
            codestream = htj2k_from_native(data, meta.image)
            if codestream is None:
                raise UnavailableSyntaxError(f"frame {index} of instance {meta.sop_instance_uid} cannot be HTJ2K")
            data = codestream
        yield data


# -- header -----------------------------------------------------------------------------------------------


def _patch(header: bytes, meta: InstanceMeta, photometric: str | None, planar: int | None) -> bytes:
    """Replace Photometric Interpretation and Planar Configuration; drop what they invalidate."""
    replacements: list[tuple[int, int, bytes]] = []
    spans = meta.spans
    if photometric and (span := spans.get(span_key(0x00280004))):
        value = photometric.encode("ascii")
        value += b" " * (len(value) % 2)
        replacements.append((*span, struct.pack("<HH2sH", 0x0028, 0x0004, b"CS", len(value)) + value))
    if planar is not None and (span := spans.get(span_key(0x00280006))):
        replacements.append((*span, struct.pack("<HH2sHH", 0x0028, 0x0006, b"US", 2, planar)))
    # The Extended Offset Table no longer matches the new fragments, and the retired Group Lengths
    # (PS3.5 7.2) of the groups whose elements change would no longer match them either.
    for tag in (0x00280000, 0x7FE00000, 0x7FE00001, 0x7FE00002):
        if span := spans.get(span_key(tag)):
            replacements.append((*span, b""))
    if not replacements:
        return header
    parts = []
    position = 0
    for start, end, data in sorted(replacements):
        parts += [header[position:start], data]
        position = end
    parts.append(header[position:])
    return b"".join(parts)


def _file_meta(meta: InstanceMeta, blobs: InstanceBlobs, syntax: UID) -> bytes:
    """The File Meta Information group (PS3.10 7.1), encoded directly.

    The received group's elements are kept byte for byte, except those that describe the writer or the
    encoding; those are dcbnode's own.
    """
    elements = {tag: blobs.file_meta[start:end] for tag, start, end in explicit_elements(blobs.file_meta)
                if tag not in _REPLACED_META}
    elements.update(writer_elements(meta.sop_class_uid, meta.sop_instance_uid, syntax))
    return file_meta_group(elements)


def _encode(header: bytes, pixel_element: Sequence[_Buffer], suffix: bytes, syntax: UID) -> bytes:
    """Join the parts (the pixel data element comes in pieces: the whole instance is copied once);
    Implicit VR output re-encodes the header and suffix through pydicom."""
    if syntax != ImplicitVRLittleEndian:
        return b"".join((header, *pixel_element, suffix))
    return b"".join((encode_little_endian(parse_explicit_le(header), implicit_vr=True), *pixel_element,
                     encode_little_endian(parse_explicit_le(suffix), implicit_vr=True) if suffix else b""))


# -- pixel data -------------------------------------------------------------------------------------------


def _encapsulated(image: ImageInfo, basic_offsets: bytes, frames: Iterable[bytes],
                  fragments: list[list[int]] | None) -> list[bytes]:
    """Encapsulated Pixel Data (PS3.5 A.4): the original fragments, or one even fragment per frame."""
    items: list[bytes] = []
    offsets: list[int] = []
    position = 0
    for index, frame in enumerate(frames):
        offsets.append(position)
        pieces = _split(frame, fragments[index]) if fragments is not None else [even(frame)]
        for piece in pieces:
            items += [_ITEM, len(piece).to_bytes(4, "little"), piece]
            position += 8 + len(piece)
    if fragments is None:
        basic_offsets = b"".join(offset.to_bytes(4, "little") for offset in offsets)
        if position > 0xFFFFFFFF:  # offsets would overflow: PS3.5 allows an empty table
            basic_offsets = b""
    table = [_ITEM, len(basic_offsets).to_bytes(4, "little"), basic_offsets]
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    return [header, *table, *items, _SEQUENCE_DELIMITER]


def _split(data: bytes, lengths: list[int]) -> list[bytes]:
    pieces = []
    position = 0
    for length in lengths:
        pieces.append(data[position : position + length])
        position += length
    return pieces


def _native_pixels(meta: InstanceMeta, blobs: InstanceBlobs, frames: FrameSource,
                   planar: int | None) -> tuple[int, str, list[_Buffer]]:
    """Tag, VR and value of the native pixel data element.

    Pixels received native come back exactly as received (VR, padding and trailing bytes included);
    decoded pixels get the VR PS3.5 A.2 prescribes and an even length.
    """
    image = meta.image
    assert image is not None
    value = [_native_frame(image, meta, frames(i), planar or 0, i) for i in range(len(meta.frames))]
    if image.source == PixelSource.NATIVE:
        return image.pixel_tag, image.pixel_vr, [*value, blobs.native_tail]
    padding = [b"\0"] if sum(len(part) for part in value) % 2 else []
    return image.pixel_tag, "OW" if image.bits_allocated > 8 else "OB", value + padding


def _native_element(tag: int, vr: str, value: list[_Buffer], syntax: UID) -> list[_Buffer]:
    group, element, length = tag >> 16, tag & 0xFFFF, sum(len(part) for part in value)
    if syntax == ImplicitVRLittleEndian:
        return [struct.pack("<HHI", group, element, length), *value]
    return [struct.pack("<HH2sHI", group, element, vr.encode(), 0, length), *value]


def _native_frame(image: ImageInfo, meta: InstanceMeta, data: bytes, planar: int, index: int) -> _Buffer:
    codec = meta.frames[index].codec
    if codec == Codec.ZSTD:
        return zstd_decompress(data)  # the received bytes, in their planar configuration
    if codec == Codec.RAW:
        return data
    array = decode_frame(codec, data, image, meta.received_syntax)
    return native_frame_bytes(array, image, planar)
