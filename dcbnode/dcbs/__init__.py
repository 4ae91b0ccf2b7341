"""DCBS: lossless, append-only, checksummed DICOM series volumes.

The library stands on its own (no network code)::

    from dcbnode import dcbs
    image = dcbs.load_from_dicom_folder("series_dir")
    dcbs.save(image, "series.dcbs")
    with dcbs.DcbStreamingReader("series.dcbs") as reader:
        blob = reader.get_dicom_for_frame(0)                         # HTJ2K Lossless Part-10 bytes
        raw = reader.get_dicom_for_frame(0, force_uncompressed=True)  # Explicit VR Little Endian
"""

from .api import DcbStreamingReader, DicomSeries, load_from_dicom_folder, save
from .errors import (
    CorruptRecordError,
    DcbsError,
    DcbsFormatError,
    InvalidDatasetError,
    UndecodablePixelDataError,
    UnsupportedTransferSyntaxError,
)
from .format import RecordKind
from .instance import EncodedInstance, ParsedInstance, encode_instance, is_valid_uid, parse_instance
from .rebuild import RebuiltInstance, UnavailableSyntaxError, available_syntaxes, rebuild
from .series import append_instance, append_instances, append_tombstone, live_instances
from .stored import StoredInstance
from .volume import (
    KeepRecord,
    RecordLocation,
    Volume,
    VolumeFullError,
    VolumeNotFoundError,
    VolumeReplacedError,
)

__all__ = [
    "CorruptRecordError",
    "DcbStreamingReader",
    "DcbsError",
    "DcbsFormatError",
    "DicomSeries",
    "EncodedInstance",
    "InvalidDatasetError",
    "KeepRecord",
    "ParsedInstance",
    "RebuiltInstance",
    "RecordKind",
    "RecordLocation",
    "StoredInstance",
    "UnavailableSyntaxError",
    "UndecodablePixelDataError",
    "UnsupportedTransferSyntaxError",
    "Volume",
    "VolumeFullError",
    "VolumeNotFoundError",
    "VolumeReplacedError",
    "append_instance",
    "append_instances",
    "append_tombstone",
    "available_syntaxes",
    "encode_instance",
    "is_valid_uid",
    "live_instances",
    "load_from_dicom_folder",
    "parse_instance",
    "rebuild",
    "save",
]
