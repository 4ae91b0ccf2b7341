"""The DCBS library API as DiCube users know it, without DiCube's losses.

>>> from dcbnode import dcbs
>>> image = dcbs.load_from_dicom_folder("series_dir")
>>> dcbs.save(image, "series.dcbs")
>>> with dcbs.DcbStreamingReader("series.dcbs") as reader:
...     blob = reader.get_dicom_for_frame(0)

A "frame" here is what DiCube calls one: one instance (slice) of the series, in InstanceNumber order
(then slice position).  A multi-frame instance is one frame of the API and comes back whole.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from .dataset_split import truncation
from .errors import DcbsError, DcbsFormatError, InvalidDatasetError
from .instance import encode_instance
from .rebuild import RebuiltInstance, available_syntaxes, rebuild
from .series import append_instance, live_instances
from .stored import StoredInstance
from .volume import Volume, fsync_directory


@dataclass(frozen=True)
class DicomSeries:
    """A DICOM series found on disk, not yet read: files in the order they will be stored."""

    series_instance_uid: str
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.files)


def _sort_key(instance_number: int | None, position: float | None, uid: str) -> tuple:
    """InstanceNumber first, then slice position, then UID; missing values sort last."""
    return (instance_number is None, instance_number or 0, position is None, position or 0.0, uid)


def load_from_dicom_folder(folder: str | os.PathLike[str], *, recursive: bool = True) -> DicomSeries:
    """Find the DICOM files of one series in ``folder``.

    Only headers are read here; pixels are read, compressed and verified one file at a time by
    :func:`save`, so a series of any size streams.  Raises :class:`InvalidDatasetError` naming the
    file for a non-DICOM file, one without pixel data, or files from more than one series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DcbsError(f"{folder}: not a directory")
    candidates = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    keyed: list[tuple[tuple, Path]] = []
    series: dict[str, Path] = {}
    instances: dict[str, Path] = {}
    for path in candidates:
        header = _read_header(path)
        series.setdefault(str(header.SeriesInstanceUID), path)
        if (first := instances.setdefault(str(header.SOPInstanceUID), path)) != path:
            raise InvalidDatasetError(f"has the same SOP Instance UID as {first}; remove one of the two",
                                      source=path)
        keyed.append((_sort_key(_int(header, "InstanceNumber"), _position(header), str(header.SOPInstanceUID)),
                      path))
    if not keyed:
        raise DcbsError(f"{folder}: no DICOM files found")
    if len(series) > 1:
        found = "; ".join(f"{uid} (e.g. {path.name})" for uid, path in series.items())
        raise InvalidDatasetError(f"{folder}: holds {len(series)} series: {found}; give one series folder")
    return DicomSeries(next(iter(series)), tuple(path for _, path in sorted(keyed)))


def _read_header(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = dcmread(path, defer_size=1024)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidDatasetError(f"not a readable DICOM file: {exc}", source=path) from exc
    # Positions in a deflated file count the inflated stream: it is checked when it is split instead.
    deflated = header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if not deflated and (problem := truncation(header, path.stat().st_size)):
        raise InvalidDatasetError(problem, source=path)
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
        if not header.get(keyword):
            raise InvalidDatasetError(f"{keyword} is missing", source=path)
    if "PixelData" not in header:
        raise InvalidDatasetError("has no Pixel Data: not an image of the series", source=path)
    return header


def _int(header, keyword: str) -> int | None:
    try:
        return int(header.get(keyword))
    except (TypeError, ValueError):
        return None


def _position(header) -> float | None:
    try:
        return float(header.ImagePositionPatient[2])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def save(image: DicomSeries, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` to a new volume at ``path`` (replaced atomically if it exists).

    Each file is encoded and verified lossless on its own; the volume appears under ``path`` only
    once complete and synced.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with Volume.open(temporary, writable=True, create=True) as volume:
            for file in image.files:
                append_instance(volume, encode_instance(file))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


class DcbStreamingReader:
    """Random access to the instances of a DCBS volume (or a DiCube 0.3.0 volume, read-only)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._dicube = None
        self._volume: Volume | None = None
        if _is_dicube(self.path):
            from .dicube_compat import DiCubeReader

            self._dicube = DiCubeReader(self.path)
            self._instances: list[StoredInstance] = []
            return
        self._volume = Volume.open(self.path)
        live = live_instances(self._volume).values()
        self._instances = sorted(live, key=lambda s: _sort_key(s.meta.instance_number, s.meta.slice_position,
                                                               s.meta.sop_instance_uid))

    def get_frame_count(self) -> int:
        """Number of frames (instances) in the volume."""
        if self._dicube is not None:
            return self._dicube.get_frame_count()
        return len(self._instances)

    def get_instance(self, index: int) -> StoredInstance:
        """The stored record of frame ``index``."""
        if self._dicube is not None:
            raise DcbsError(f"{self.path}: DiCube volumes hold no DCBS records")
        if not 0 <= index < len(self._instances):
            raise IndexError(f"frame {index} out of range: {self.path} has {len(self._instances)} frames")
        return self._instances[index]

    def get_dicom_for_frame(self, index: int, force_uncompressed: bool = False) -> bytes:
        """Part-10 bytes of frame ``index``: HTJ2K Lossless, or native when ``force_uncompressed``.

        Instances that arrived lossy-compressed come back in their original syntax (never
        re-encoded), or decoded to native with ``force_uncompressed``.
        """
        if self._dicube is not None:
            return self._dicube.get_dicom_for_frame(index, force_uncompressed=force_uncompressed)
        stored = self.get_instance(index)
        # available_syntaxes lists HTJ2K Lossless first whenever the frames allow it.
        syntax = ExplicitVRLittleEndian if force_uncompressed else available_syntaxes(stored.meta)[0]
        return self.rebuild(index, syntax).part10()

    def rebuild(self, index: int, transfer_syntax: str) -> RebuiltInstance:
        """Rebuild frame ``index`` in any syntax it is available in (see ``available_syntaxes``)."""
        stored = self.get_instance(index)
        return rebuild(stored.meta, stored.blobs, stored.frame, transfer_syntax)

    def close(self) -> None:
        """Release the file."""
        if self._volume is not None:
            self._volume.close()
        if self._dicube is not None:
            self._dicube.close()

    def __enter__(self) -> DcbStreamingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_dicube(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(8) == b"DCMCUBES"
    except OSError as exc:
        raise DcbsFormatError(f"{path}: cannot open: {exc.strerror}") from exc
