"""Turning received pixel data into stored frames, and stored frames back into pixels.

Native integer pixels become HTJ2K lossless frames, each decoded again and compared before it is
accepted; what HTJ2K cannot hold (float, 1-bit, 32-bit, subsampled YBR) becomes zstd of the raw bytes;
lossy codestreams are kept byte for byte.  Decoding of legacy compressed syntaxes goes through
pydicom's decoder registry (GDCM and pylibjpeg plugins).
"""

from __future__ import annotations

import logging

import imagecodecs
import numpy as np
import zstandard
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from . import imagecodecs_decoder
from .errors import UndecodablePixelDataError
from .record import Codec, ImageInfo
from .syntaxes import is_lossy_syntax

#: Photometric interpretations whose samples are not one value per pixel per component.
_SUBSAMPLED = frozenset({"YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"})
_ZSTD_LEVEL = 3
#: Wavelet decompositions for 16-bit frames of at least 128 × 128 (imagecodecs calls the count
#: ``resolutions``; its default is 5).  HTJ2K codes values after a DC shift of half the 16-bit range,
#: so the lowest band of 12-bit data held in 16 bits carries large coefficients; two more levels shrink
#: that band from 16² to 4² coefficients on a 512² image: 0.14 % smaller frames on the CT bench series
#: (8 would gain nothing more), at no measurable cost in encoding or decoding time.
_DECOMPOSITIONS = 7
_DECOMPOSITIONS_MIN_SIDE = 1 << _DECOMPOSITIONS
log = logging.getLogger(__name__)
imagecodecs_decoder.register()  # 12-bit JPEG Extended that GDCM and pylibjpeg cannot decode


def native_dtype(bits_allocated: int, pixel_representation: int, pixel_tag: int) -> np.dtype | None:
    """Little-endian numpy dtype of one native sample, or None for 1-bit data."""
    if pixel_tag == 0x7FE00008:
        return np.dtype("<f4")
    if pixel_tag == 0x7FE00009:
        return np.dtype("<f8")
    if bits_allocated % 8 or bits_allocated == 0:
        return None
    kind = "i" if pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{bits_allocated // 8}")


def swap_native_bytes(value: bytes, bits_allocated: int, vr: str) -> bytes:
    """Native Pixel Data between big and little endian (PS3.5 A.3): each sample swapped, or each 16-bit
    word of 8-bit or 1-bit data held as OW; OB is a byte stream.  Its own inverse."""
    size = {"OB": 1, "OF": 4, "OD": 8}.get(vr, max(2, bits_allocated // 8))
    if bits_allocated == 1:
        size = 2 if vr == "OW" else 1
    if size == 1:
        return value
    usable = len(value) - len(value) % size
    swapped = np.frombuffer(value, dtype=f">u{size}", count=usable // size).astype(f"<u{size}")
    return swapped.tobytes() + value[usable:]


def frame_shape(rows: int, columns: int, samples: int) -> tuple[int, ...]:
    """Array shape of one interleaved frame."""
    return (rows, columns) if samples == 1 else (rows, columns, samples)


def htj2k_eligible(dtype: np.dtype | None, samples: int, photometric: str) -> bool:
    """Whether frames of this kind are stored as HTJ2K (8/16-bit integers, grey or 3-sample colour)."""
    return (
        dtype is not None
        and dtype.kind in "iu"
        and dtype.itemsize in (1, 2)
        and samples in (1, 3)
        and photometric not in _SUBSAMPLED
    )


def is_canonical(samples: np.ndarray, bits_stored: int) -> bool:
    """True when the bits above BitsStored are what a decoder produces (zeros, or the sign).

    HTJ2K carries pixel *values*: a decoder hands back the container as encoded, while pydicom reads
    native data by masking (unsigned) or sign-extending (signed) from BitsStored.  Only when the
    two agree is HTJ2K both bit-exact and displayed right; otherwise the frame is kept as zstd.
    """
    unused = samples.dtype.itemsize * 8 - bits_stored
    if unused <= 0:
        return True
    shifted = (samples << unused) >> unused if samples.dtype.kind == "i" else samples & ((1 << bits_stored) - 1)
    return bool(np.array_equal(shifted, samples))


def uses_colour_transform(samples: int, photometric: str) -> bool:
    """HTJ2K's reversible colour transform applies to RGB only (PS3.5 8.2.4: YBR_RCT)."""
    return samples == 3 and photometric == "RGB"


def encode_htj2k_verified(frame: np.ndarray, colour_transform: bool) -> bytes | None:
    """Encode one frame as HTJ2K lossless and return it only if it decodes back bit-exact.

    None (the caller keeps the frame as zstd, still lossless) when the codec fails or disagrees, so a
    codec problem never turns into a failed store.
    """
    options: dict[str, int] = {}
    if frame.dtype.itemsize == 2 and min(frame.shape[:2]) >= _DECOMPOSITIONS_MIN_SIDE:
        options["resolutions"] = _DECOMPOSITIONS
    try:
        codestream = imagecodecs.htj2k_encode(np.ascontiguousarray(frame), rgb=colour_transform, **options)
        decoded = imagecodecs.htj2k_decode(codestream)
    except Exception as exc:  # imagecodecs raises its own error types per codec
        log.warning("HTJ2K encoding failed (%s); keeping the frame as zstd", exc)
        return None
    if decoded.dtype != frame.dtype or decoded.shape != frame.shape or not np.array_equal(decoded, frame):
        return None
    return bytes(codestream)


def htj2k_output_photometric(image: ImageInfo) -> str | None:
    """The photometric interpretation HTJ2K output of these frames has (YBR_RCT for RGB), or None when
    frames of this kind are never HTJ2K (see :func:`htj2k_eligible`)."""
    dtype = native_dtype(image.bits_allocated, image.pixel_representation, image.pixel_tag)
    if not htj2k_eligible(dtype, image.samples_per_pixel, image.photometric):
        return None
    return "YBR_RCT" if uses_colour_transform(image.samples_per_pixel, image.photometric) else image.photometric


def htj2k_from_native(frame: bytes, image: ImageInfo) -> bytes | None:
    """One native frame (little endian, as received) as verified-lossless HTJ2K, or None when it cannot
    be: frames of this kind are not HTJ2K-eligible, bits above BitsStored are set, or the codec failed."""
    if htj2k_output_photometric(image) is None:
        return None
    dtype = native_dtype(image.bits_allocated, image.pixel_representation, image.pixel_tag)
    flat = np.frombuffer(frame, dtype=dtype, count=image.rows * image.columns * image.samples_per_pixel)
    if not is_canonical(flat, image.bits_stored):
        return None
    return encode_htj2k_verified(interleaved(flat, image), uses_colour_transform(image.samples_per_pixel,
                                                                                image.photometric))


def interleaved(flat: np.ndarray, image: ImageInfo) -> np.ndarray:
    """A frame's samples as an interleaved array (rows, columns[, samples]), whatever its planar
    configuration."""
    if image.samples_per_pixel > 1 and image.planar_configuration == 1:
        return flat.reshape(image.samples_per_pixel, image.rows, image.columns).transpose(1, 2, 0)
    return flat.reshape(frame_shape(image.rows, image.columns, image.samples_per_pixel))


def zstd_compress(data: bytes | memoryview) -> bytes:
    """zstd of raw bytes, for what HTJ2K cannot hold."""
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def zstd_decompress(data: bytes) -> bytes:
    """Inverse of :func:`zstd_compress`."""
    return zstandard.ZstdDecompressor().decompress(data)


def decoder_options(image: ImageInfo, photometric: str) -> dict[str, object]:
    """pydicom decoder keyword arguments describing one frame of ``image``."""
    options: dict[str, object] = {
        "rows": image.rows,
        "columns": image.columns,
        "samples_per_pixel": image.samples_per_pixel,
        "bits_allocated": image.bits_allocated,
        "bits_stored": image.bits_stored,
        "pixel_representation": image.pixel_representation,
        "photometric_interpretation": photometric,
        "number_of_frames": 1,
    }
    if image.samples_per_pixel > 1:
        options["planar_configuration"] = image.planar_configuration or 0
    return options


def decode_with_pydicom(codestream: bytes, syntax: str, image: ImageInfo, *, raw: bool) -> np.ndarray:
    """Decode one encapsulated frame with pydicom's decoder for ``syntax``.

    ``raw`` keeps the stored colour space (no YBR→RGB conversion): the right choice for lossless data,
    whose stored values must come back unchanged.
    """
    try:
        array, _ = get_decoder(syntax).as_array(encapsulate([codestream]), raw=raw,
                                               **decoder_options(image, image.photometric))
    except Exception as exc:  # every plugin raises its own types
        raise UndecodablePixelDataError(f"compressed frame cannot be decoded: {exc}") from exc
    return array


def decode_frame(codec: str, data: bytes, image: ImageInfo, received_syntax: str) -> np.ndarray:
    """Decode one stored frame to its native array (interleaved samples)."""
    if codec in (Codec.HTJ2K, Codec.HTJ2K_SHARED):  # StoredInstance.frame restored the shared header
        return imagecodecs.htj2k_decode(data)
    if codec in (Codec.ZSTD, Codec.RAW):
        dtype = native_dtype(image.bits_allocated, image.pixel_representation, image.pixel_tag)
        return interleaved(np.frombuffer(zstd_decompress(data) if codec == Codec.ZSTD else data, dtype=dtype), image)
    return decode_with_pydicom(data, received_syntax, image, raw=not is_lossy_syntax(received_syntax))


def native_frame_bytes(frame: np.ndarray, image: ImageInfo, planar: int) -> memoryview:
    """Native little-endian bytes of a decoded frame, in the requested planar configuration (a byte view
    of the array, not a copy: the rebuilt instance copies it once, into its own bytes)."""
    dtype = native_dtype(image.bits_allocated, image.pixel_representation, image.pixel_tag)
    array = frame.astype(dtype, copy=False) if dtype is not None else frame
    if image.samples_per_pixel > 1 and planar == 1:
        array = array.transpose(2, 0, 1)
    return memoryview(np.ascontiguousarray(array)).cast("B")
