"""Lossless encoders for the compressed syntaxes instances arrive in, to serve them back as they were sent.

An instance received in a lossless compressed syntax (JPEG Lossless, JPEG-LS Lossless, JPEG 2000 Lossless,
RLE Lossless) is stored as verified HTJ2K.  A peer that accepts only the syntax it was sent in gets each
frame encoded into that syntax again, losslessly, and decoded back by pydicom's decoders (GDCM, pylibjpeg)
and compared before it is sent; a frame that does not come back exactly makes the syntax unavailable for
the instance, never a different image.  One encoder per syntax, as pydicom keeps one plugin per library:

===========================  ===========================================  ==================================
syntax                       encoder                                      notes
===========================  ===========================================  ==================================
JPEG Lossless (.57, .70)     imagecodecs ``jpeg8_encode`` (libjpeg-turbo)  first-order prediction (SV1)
JPEG-LS Lossless (.80)       imagecodecs ``jpegls_encode`` (CharLS)       near = 0
JPEG 2000 Lossless (.90)     imagecodecs ``jpeg2k_encode`` (OpenJPEG)     reversible 5/3; RCT for YBR_RCT
RLE Lossless (.5)            pydicom's own RLE encoder                    PS3.5 Annex G
===========================  ===========================================  ==================================

Signed samples go to the JPEG and JPEG-LS encoders as their BitsStored-bit two's complement patterns, as
PS3.5 8.2 has decoders hand them back.
"""

from __future__ import annotations

from collections.abc import Callable

import imagecodecs
import numpy as np
from pydicom.pixels import get_encoder
from pydicom.uid import UID, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from .errors import UndecodablePixelDataError
from .pixels import decode_with_pydicom, decoder_options
from .record import ImageInfo

Encoder = Callable[[np.ndarray, ImageInfo], bytes]


def _bit_pattern(frame: np.ndarray, image: ImageInfo) -> np.ndarray:
    """Signed samples as the unsigned BitsStored-bit patterns the JPEG family codes."""
    if frame.dtype.kind != "i":
        return frame
    unsigned = frame.view(frame.dtype.str.replace("i", "u"))
    return unsigned & ((1 << image.bits_stored) - 1)


def _jpeg_lossless(frame: np.ndarray, image: ImageInfo) -> bytes:
    return imagecodecs.jpeg8_encode(_bit_pattern(frame, image), lossless=True, predictor=1,
                                    bitspersample=image.bits_stored, colorspace="RGB" if frame.ndim == 3 else None)


def _jpegls(frame: np.ndarray, image: ImageInfo) -> bytes:
    return imagecodecs.jpegls_encode(_bit_pattern(frame, image), level=0)


def _jpeg2000(frame: np.ndarray, image: ImageInfo) -> bytes:
    return imagecodecs.jpeg2k_encode(frame, level=0, codecformat="J2K", reversible=True,
                                     mct=image.photometric == "YBR_RCT", bitspersample=image.bits_stored)


def _rle(frame: np.ndarray, image: ImageInfo) -> bytes:
    options = decoder_options(image, image.photometric)
    options["planar_configuration"] = 0  # the array is interleaved; RLE segments are per sample anyway
    return get_encoder(RLELossless).encode(frame, encoding_plugin="pydicom", **options)


#: The encoder of each lossless syntax an instance can be served back in.
ENCODERS: dict[UID, Encoder] = {
    JPEGLosslessSV1: _jpeg_lossless,
    JPEGLossless: _jpeg_lossless,
    JPEGLSLossless: _jpegls,
    JPEG2000Lossless: _jpeg2000,
    RLELossless: _rle,
}


def encode_lossless(frame: np.ndarray, image: ImageInfo, syntax: str) -> bytes:
    """``frame`` (interleaved samples, as stored) encoded in ``syntax``, checked to decode back exactly with
    pydicom's decoders; raises :class:`UndecodablePixelDataError` saying why when it cannot be."""
    encoder = ENCODERS.get(UID(syntax))
    if encoder is None:
        raise UndecodablePixelDataError(f"no lossless encoder for {UID(syntax).name}")
    try:
        codestream = bytes(encoder(np.ascontiguousarray(frame), image))
    except Exception as exc:  # every codec library raises its own types
        raise UndecodablePixelDataError(f"{UID(syntax).name} encoder refused the frame: {exc}") from exc
    if len(codestream) % 2:
        codestream += b"\0"  # PS3.5 A.4: fragments have an even length
    decoded = decode_with_pydicom(codestream, syntax, image, raw=True)
    if decoded.shape != frame.shape or not np.array_equal(decoded.astype(frame.dtype, copy=False), frame):
        raise UndecodablePixelDataError(f"{UID(syntax).name} re-encoding does not decode back exactly")
    return codestream
