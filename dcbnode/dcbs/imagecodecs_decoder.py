"""A pydicom decoder plugin for 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) using imagecodecs.

Neither of pydicom's installed plugins decodes every 12-bit JPEG Extended frame: GDCM has no 12-bit
JPEG Extended support, and pylibjpeg-libjpeg rejects some real files (pydicom's ``JPEG-lossy.dcm``:
"scan start must be zero and scan stop must be 63").  imagecodecs' ``jpeg8_decode`` (libjpeg-turbo 3,
12-bit capable) decodes them.  It is added to pydicom's decoder for that syntax through pydicom's public
plugin interface (``Decoder.add_plugin``), after the stock plugins, so it is tried only when they fail.
Monochrome only: colour JPEG goes through the stock plugins, which handle the YBR conversions.
"""

from __future__ import annotations

import imagecodecs
from pydicom.pixels.decoders import JPEGExtended12BitDecoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import JPEGExtended12Bit

LABEL = "dcbnode-imagecodecs"
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("imagecodecs>=2024.9.22",)}


def is_available(uid: str) -> bool:
    """pydicom plugin protocol: whether this plugin can decode ``uid``."""
    return uid in DECODER_DEPENDENCIES


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom plugin protocol: one frame's samples, native little endian."""
    if runner.samples_per_pixel != 1:
        raise ValueError("the imagecodecs plugin decodes monochrome JPEG Extended only")
    array = imagecodecs.jpeg8_decode(src)
    if array.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded {array.shape}, the dataset says {(runner.rows, runner.columns)}")
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def register() -> None:
    """Add this plugin to pydicom's JPEG Extended decoder once per process."""
    if LABEL not in JPEGExtended12BitDecoder.available_plugins:
        JPEGExtended12BitDecoder.add_plugin(LABEL, (__name__, "_decode_frame"))
