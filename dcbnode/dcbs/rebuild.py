"""Rebuild a standard DICOM instance from a stored record.

Three forms (PS3.5 transfer syntaxes):

* HTJ2K — the stored codestreams spliced into encapsulated Pixel Data with a Basic Offset Table, one
  fragment per frame; no pixel is decoded;
* native — Explicit or Implicit VR Little Endian (and Big Endian or Deflated for an instance received
  so), frames decoded bit-exact;
* original — the received compressed syntax, its Pixel Data rebuilt byte for byte.

The header is the stored Explicit VR Little Endian bytes (each value's bytes as received), with at most
a few top-level elements replaced (Photometric Interpretation, Planar Configuration) or dropped (the
Extended Offset Table, whose offsets no longer hold), and its element headers rewritten for the output
encoding (``transcode``).  In the received syntax the dataset bytes are those received; in another,
Group Lengths are recomputed for the new encoding.  Output is deterministic.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
)

from .dataset_split import explicit_elements, span_key
from .errors import DcbsError, UndecodablePixelDataError
from .file_meta import even, file_meta_group, writer_elements
from .lossless_encoders import ENCODERS, encode_lossless
from .pixels import decode_frame, htj2k_from_native, native_frame_bytes, swap_native_bytes, zstd_decompress
from .record import Codec, ImageInfo, InstanceBlobs, InstanceMeta, PixelSource
from .transcode import EXPLICIT_LE, Encoding, element_header, encoding_of, top_level_spans, transcode

_ITEM = 0xE000FFFE.to_bytes(4, "little")
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PREAMBLE = b"\0" * 128 + b"DICM"
_HTJ2K_OUTPUTS = (HTJ2KLossless, HTJ2K)
#: Syntaxes whose Pixel Data is native (PS3.5 A.1–A.5).
_NATIVE_OUTPUTS = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                             DeflatedExplicitVRLittleEndian})
#: zlib's default level, the one DCMTK and pydicom deflate with: a dataset received deflated by them
#: comes back in the very bytes it arrived in.
_DEFLATE_LEVEL = 6
_PIXEL_GROUP_LENGTH = 0x7FE00000
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
    received = UID(meta.received_syntax)
    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    if received in _NATIVE_OUTPUTS and received not in native:
        native.append(received)  # Big Endian or Deflated, written from the stored bytes
    if image is None:
        return native if received in native else [received, *native]
    if not image.decodable:
        return [received]  # kept as received: no decoder reads it, so nothing else can be made of it
    syntaxes: list[UID] = []
    if image.htj2k_photometric is not None:
        syntaxes.extend(_HTJ2K_OUTPUTS)
    if image.source == PixelSource.ORIGINAL or (image.source == PixelSource.TRANSCODED and received in ENCODERS):
        syntaxes.append(received)
    return syntaxes + native


def rebuild(meta: InstanceMeta, blobs: InstanceBlobs, frames: FrameSource, syntax: str) -> RebuiltInstance:
    """Rebuild the instance in ``syntax``; ``frames(i)`` returns the stored bytes of frame ``i``.

    In the syntax it was received in, an instance comes back with the dataset bytes it arrived with;
    in another, every value keeps its bytes and only element headers, Group Lengths and the pixel
    module attributes the new pixel encoding requires change.
    """
    syntax = UID(syntax)
    if syntax not in available_syntaxes(meta):
        raise UnavailableSyntaxError(f"instance {meta.sop_instance_uid} cannot be rebuilt as {syntax}")
    image = meta.image
    header = blobs.header
    pixel: list[_Buffer] = []
    target = encoding_of(syntax)
    if image is None:
        pass
    elif syntax == meta.received_syntax and image.fragments is not None:
        # the encapsulated Pixel Data as received: its codestreams, fragments and Basic Offset Table
        pixel = _encapsulated(image, blobs.basic_offsets, _each(frames, meta), image.fragments, image.pixel_vr)
    elif syntax in _HTJ2K_OUTPUTS:
        header = _patch(header, meta, image.htj2k_photometric, 0)
        pixel = _encapsulated(image, b"", _htj2k_frames(frames, meta), None)
    elif syntax == meta.received_syntax and image.source == PixelSource.TRANSCODED:
        # Received lossless in another codec and stored as HTJ2K: encoded into it again, verified; the
        # header says what it said on arrival.
        header = _patch(header, meta, None, None)
        pixel = _encapsulated(image, b"", _reencoded_frames(frames, meta, syntax), None, image.pixel_vr,
                              offset_table=bool(blobs.basic_offsets))
    else:
        planar = image.planar_configuration if image.source == PixelSource.NATIVE else 0
        header = _patch(header, meta, image.native_photometric, planar)
        tag, vr, value = _native_pixels(meta, blobs, frames, planar)
        pixel = _native_element(tag, vr, value, target, image)
    recompute = syntax != meta.received_syntax or header is not blobs.header
    # (7FE0,0000) has a span when the header holds one: only then is the output header walked for it.
    pixel_group_length = recompute and bool(pixel) and span_key(_PIXEL_GROUP_LENGTH) in meta.spans
    dataset = _encode(header, pixel, blobs.suffix, syntax, recompute_group_lengths=recompute,
                      pixel_group_length=pixel_group_length)
    return RebuiltInstance(syntax, _file_meta(meta, blobs, syntax), dataset)


def _reencoded_frames(frames: FrameSource, meta: InstanceMeta, syntax: UID) -> Iterator[bytes]:
    """The frames decoded from their stored form and encoded losslessly in ``syntax`` (verified)."""
    image = meta.image
    assert image is not None
    for index, entry in enumerate(meta.frames):
        array = decode_frame(entry.codec, frames(index), image, meta.received_syntax)
        try:
            yield encode_lossless(array, image, syntax)
        except UndecodablePixelDataError as exc:
            raise UnavailableSyntaxError(f"frame {index} of instance {meta.sop_instance_uid}: {exc.reason}") from exc


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
    """Replace Photometric Interpretation and Planar Configuration where the pixels' new form needs another
    value, and drop the Extended Offset Table (PS3.5 A.4), whose offsets no longer hold.  Returns
    ``header`` itself when nothing changes."""
    replacements: list[tuple[int, int, bytes]] = []
    spans = meta.spans
    span = spans.get(span_key(0x00280004))
    # Compared as text: a vendor's NUL padding ("MONOCHROME2\0") stays when the value does.
    if photometric and span and header[span[0] + 8 : span[1]].rstrip(b" \0").decode("ascii", "replace") != photometric:
        value = even(photometric.encode("ascii"), b" ")
        replacements.append((*span, struct.pack("<HH2sH", 0x0028, 0x0004, b"CS", len(value)) + value))
    span = spans.get(span_key(0x00280006))
    if planar is not None and span and header[span[0] + 8 : span[1]] != struct.pack("<H", planar):
        replacements.append((*span, struct.pack("<HH2sHH", 0x0028, 0x0006, b"US", 2, planar)))
    for tag in (0x7FE00001, 0x7FE00002):
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


def _encode(header: bytes, pixel_element: Sequence[_Buffer], suffix: bytes, syntax: UID, *,
            recompute_group_lengths: bool, pixel_group_length: bool = False) -> bytes:
    """Join the parts in ``syntax``'s encoding (the pixel data element comes in pieces: the whole instance
    is copied once), with the Group Lengths recomputed for the new bytes when asked."""
    target = encoding_of(syntax)
    if target != EXPLICIT_LE or recompute_group_lengths:
        header = transcode(header, EXPLICIT_LE, target, recompute_group_lengths=recompute_group_lengths)
        suffix = transcode(suffix, EXPLICIT_LE, target, recompute_group_lengths=recompute_group_lengths)
        if pixel_group_length:
            header = _with_pixel_group_length(header, sum(len(part) for part in pixel_element), suffix, target)
    dataset = b"".join((header, *pixel_element, suffix))
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(_DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset = deflater.compress(dataset) + deflater.flush()
    return dataset


def _with_pixel_group_length(header: bytes, pixel_length: int, suffix: bytes, target: Encoding) -> bytes:
    """``header`` with its (7FE0,0000) Group Length, if any, counting the pixel data element and the
    group's elements in ``suffix`` too (``transcode`` saw only the header's)."""
    spans = list(top_level_spans(header, target))
    start = next((start for tag, start, _ in spans if tag == _PIXEL_GROUP_LENGTH), None)
    if start is None:
        return header
    following = sum(end - begin for tag, begin, end in spans if tag >> 16 == 0x7FE0 and tag != _PIXEL_GROUP_LENGTH)
    following += pixel_length + sum(end - begin for tag, begin, end in top_level_spans(suffix, target)
                                    if tag >> 16 == 0x7FE0)
    value_start = start + 8  # a UL element's header is 8 bytes in every encoding
    order = "<" if target.little_endian else ">"
    return header[:value_start] + struct.pack(order + "I", following) + header[value_start + 4 :]


# -- pixel data -------------------------------------------------------------------------------------------


def _encapsulated(image: ImageInfo, basic_offsets: bytes, frames: Iterable[bytes],
                  fragments: list[list[int]] | None, vr: str = "OB", *, offset_table: bool = True) -> list[bytes]:
    """Encapsulated Pixel Data (PS3.5 A.4): the original fragments and offset table, or one even fragment
    per frame and a Basic Offset Table of them (an empty one without ``offset_table``)."""
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
        if position > 0xFFFFFFFF or not offset_table:  # offsets would overflow: PS3.5 allows an empty table
            basic_offsets = b""
    table = [_ITEM, len(basic_offsets).to_bytes(4, "little"), basic_offsets]
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr.encode(), 0, 0xFFFFFFFF)
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


def _native_element(tag: int, vr: str, value: list[_Buffer], target: Encoding, image: ImageInfo) -> list[_Buffer]:
    """The native pixel data element in ``target``'s encoding (Big Endian: samples swapped back)."""
    length = sum(len(part) for part in value)
    if not target.little_endian:
        value = [swap_native_bytes(b"".join(value), image.bits_allocated, vr)]
    return [element_header(tag, vr, length, target), *value]


def _native_frame(image: ImageInfo, meta: InstanceMeta, data: bytes, planar: int, index: int) -> _Buffer:
    codec = meta.frames[index].codec
    if codec == Codec.ZSTD:
        return zstd_decompress(data)  # the received bytes, in their planar configuration
    if codec == Codec.RAW:
        return data
    array = decode_frame(codec, data, image, meta.received_syntax)
    return native_frame_bytes(array, image, planar)
