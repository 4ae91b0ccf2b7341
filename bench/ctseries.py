"""Realistic 512×512 12-bit CT series for benchmarks and end-to-end tests.

``make_ct_series(out_dir, count)`` writes ``count`` Explicit VR Little Endian Part-10 CT slices of one series
(BitsAllocated 16, BitsStored 12, PixelRepresentation 0, RescaleSlope 1 / RescaleIntercept -1024 kept from
the source). Every slice comes from one real CT slice, moved by a few pixels (smoothly along the series, as
anatomy drifts between neighbouring slices) plus Gaussian noise of σ = 1 stored value, so no two slices share
pixel data while lossless HTJ2K still compresses them about 3.5–4× (the source alone: 4.1×).

Source slice, first one available offline wins (``source="auto"``):

1. ``pydicom-data``'s ``bad_sequence.dcm``: a real Siemens SOMATOM 512² neck CT, 12-bit unsigned, JPEG
   lossless (``get_testdata_file(..., download=False)``, never a network fetch). Its header is reused with
   invalid bits fixed (hash "UIDs", a 64-character Study ID, a stray top-level Code Meaning).
2. ``dicompyler-core``'s sdist ``tests/testdata/example_data/ct.0.dcm`` (512², 16-bit signed HU), fetched
   once with ``pip download --no-deps --no-binary :all: dicompyler-core==0.5.6`` into ``bench/.cache/sdist``
   and converted to 12-bit unsigned (stored = HU + 1024, clipped to 0..4095, intercept -1024).
3. A synthetic body phantom (last resort; compresses a little better than real anatomy).

Generated series are cached read-only under ``bench/.cache/ctseries/<key>/`` (only the DICOM files, so
``storescu +sd`` can send the folder; ``<key>.json`` beside it records them) keyed by every parameter and
``GENERATOR_VERSION``; ``cached_ct_series`` returns those paths directly, ``make_ct_series`` copies them.
UIDs are deterministic (``generate_uid`` under pydicom's root, hashed from the parameters), so the same
parameters always give the same instances and different ``seed``/``count`` never collide.

CLI: ``python bench/ctseries.py OUT --count N [--seed S] [--study-uid UID] [--source NAME] [--ratio]``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "CACHE_DIR",
    "GENERATOR_VERSION",
    "SOURCES",
    "SourceSlice",
    "cached_ct_series",
    "htj2k_ratio",
    "load_source_slice",
    "main",
    "make_ct_series",
]

GENERATOR_VERSION = 1
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DICOMPYLER_SDIST = "dicompyler-core==0.5.6"
DICOMPYLER_MEMBER = "tests/testdata/example_data/ct.0.dcm"
MAX_SHIFT = 4  # pixels of smooth drift along the series
NOISE_SIGMA = 1.0  # stored values; keeps HTJ2K lossless ratio realistic (~3.7× on the Siemens source)


@dataclass(frozen=True)
class SourceSlice:
    """One real (or synthetic) CT slice: a header without pixel data and 12-bit unsigned stored pixels."""

    name: str
    header: Dataset
    pixels: np.ndarray  # (512, 512) uint16, values 0..4095


# --------------------------------------------------------------------------- sources


def _from_pydicom_data(cache_dir: Path) -> SourceSlice | None:
    """Siemens 12-bit neck CT from the ``pydicom-data`` package, if installed (no download)."""
    with warnings.catch_warnings():  # the anonymised source has hash "UIDs" and a 64-char Study ID
        warnings.simplefilter("ignore")
        try:
            from pydicom.data import get_testdata_file

            path = get_testdata_file("bad_sequence.dcm", download=False)
            if path is None:
                return None
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception:  # missing package or no JPEG-lossless decoder
            return None
        if pixels.shape != (512, 512) or ds.BitsStored != 12 or ds.PixelRepresentation != 0:
            return None
        return SourceSlice("siemens-neck", _clean_header(ds), np.asarray(pixels, dtype=np.uint16))


def _from_dicompyler(cache_dir: Path) -> SourceSlice | None:
    """512² CT slice from the dicompyler-core sdist (PyPI), converted from signed HU to 12-bit unsigned."""
    sdist_dir = cache_dir / "sdist"
    member_file = sdist_dir / "dicompyler-ct.0.dcm"
    if not member_file.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        tarballs = sorted(sdist_dir.glob("dicompyler[-_]core-*.tar.gz"))
        if not tarballs:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   DICOMPYLER_SDIST, "-d", str(sdist_dir)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=180)
            except (OSError, subprocess.SubprocessError):
                return None
            tarballs = sorted(sdist_dir.glob("dicompyler[-_]core-*.tar.gz"))
            if not tarballs:
                return None
        with tarfile.open(tarballs[-1]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(DICOMPYLER_MEMBER)), None)
            if member is None:
                return None
            data = tar.extractfile(member)
            if data is None:
                return None
            tmp = member_file.with_suffix(".tmp")
            tmp.write_bytes(data.read())
            tmp.replace(member_file)
    ds = pydicom.dcmread(member_file)
    hu = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    pixels = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    return SourceSlice("dicompyler-ct0", _clean_header(ds), pixels)


def _synthetic(cache_dir: Path) -> SourceSlice:
    """A body-shaped phantom with smooth texture and CT-like noise (last resort)."""
    rng = np.random.default_rng(12345)
    y, x = np.mgrid[-256:256, -256:256].astype(np.float64)
    hu = np.full((512, 512), -1000.0)
    body = (x / 200) ** 2 + (y / 150) ** 2 < 1
    hu[body] = -90  # fat
    hu[(x / 185) ** 2 + (y / 135) ** 2 < 1] = 40  # soft tissue
    for cx in (-85, 85):
        hu[((x - cx) / 60) ** 2 + ((y + 10) / 80) ** 2 < 1] = -820  # lungs
    hu[(x / 22) ** 2 + ((y - 95) / 22) ** 2 < 1] = 900  # vertebra
    hu[(x / 40) ** 2 + ((y - 150) / 6) ** 2 < 1] = -1000  # table gap
    spectrum = np.fft.rfft2(rng.normal(0, 1, (512, 512)))
    fy = np.fft.fftfreq(512)[:, None]
    fx = np.fft.rfftfreq(512)[None, :]
    texture = np.fft.irfft2(spectrum * np.exp(-((fx**2 + fy**2) / 0.002)), s=(512, 512))
    hu += body * (texture / texture.std() * 15 + rng.normal(0, 8, (512, 512)))
    pixels = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.Manufacturer = "dcbnode-bench"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.SeriesNumber = "2"
    ds.AcquisitionNumber = "1"
    ds.ImagePositionPatient = [-250, -250, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    return SourceSlice("synthetic", _clean_header(ds), pixels)


SOURCES: dict[str, Callable[[Path], SourceSlice | None]] = {
    "pydicom-data": _from_pydicom_data,
    "dicompyler": _from_dicompyler,
    "synthetic": _synthetic,
}


_DROPPED = (
    0x7FE00010,  # PixelData
    0x00080104,  # stray top-level CodeMeaning in the Siemens source
    0x00280106, 0x00280107,  # Smallest/LargestImagePixelValue: recomputed per slice
    0x00080018, 0x0020000D, 0x0020000E, 0x00200052,  # UIDs: replaced per series/slice
)


def _clean_header(ds: Dataset) -> Dataset:
    """Copy of ``ds`` without pixel data, file meta or the source's invalid/identifying values."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag in _DROPPED:
            continue
        if elem.tag.is_private:
            continue
        out.add(copy.deepcopy(elem))
    out.StudyID = "1"
    out.AccessionNumber = ""
    out.ReferringPhysicianName = ""
    for keyword in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        setattr(out, keyword, "20240102")
    for keyword in ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime"):
        setattr(out, keyword, "101500")
    out.SeriesDescription = "dcbnode bench CT"
    out.StudyDescription = "dcbnode bench"
    return out


def load_source_slice(source: str = "auto", cache_dir: Path = CACHE_DIR) -> SourceSlice:
    """The first available source slice (``"auto"``) or the named one from ``SOURCES``."""
    names = list(SOURCES) if source == "auto" else [source]
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"unknown source {name!r}; choose from {[*SOURCES, 'auto']}")
        found = SOURCES[name](cache_dir)
        if found is not None:
            return found
    raise RuntimeError(f"CT source {source!r} is not available offline")


# --------------------------------------------------------------------------- generation


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["dcbnode-bench", *map(str, parts)]))


def _slice_pixels(src: np.ndarray, index: int, seed: int) -> np.ndarray:
    """Slice ``index``: the source moved by a smooth per-series drift (≤ MAX_SHIFT px) plus σ=1 noise."""
    phase = np.random.default_rng([seed, 0x5EED]).uniform(0, 2 * math.pi, 2)
    dy = round(MAX_SHIFT * math.sin(2 * math.pi * index / 97 + phase[0]))
    dx = round(MAX_SHIFT * math.cos(2 * math.pi * index / 131 + phase[1]))
    rng = np.random.default_rng([seed, index])
    moved = np.roll(src, (dy, dx), axis=(0, 1)).astype(np.float32)
    moved += rng.normal(0.0, NOISE_SIGMA, src.shape).astype(np.float32)
    return np.clip(np.rint(moved), 0, 4095).astype(np.uint16)


def _write_series(src: SourceSlice, out_dir: Path, count: int, seed: int, study_uid: str) -> list[str]:
    """Write the series into ``out_dir``; return the file names in instance order."""
    series_uid = _uid("series", study_uid, seed, count, src.name)
    frame_uid = _uid("frame", study_uid, seed, count, src.name)
    x0, y0, z0 = (float(v) for v in src.header.get("ImagePositionPatient", [-250, -250, 0]))
    thickness = float(src.header.get("SliceThickness", 1) or 1)
    names = []
    for i in range(count):
        ds = copy.deepcopy(src.header)
        sop_uid = _uid("sop", study_uid, seed, count, src.name, i)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = f"BENCH^CT{seed}"
        ds.PatientID = f"DCBBENCH{seed}"
        ds.InstanceNumber = i + 1
        z = z0 - i * thickness
        ds.ImagePositionPatient = [x0, y0, round(z, 4)]
        ds.SliceLocation = round(-z if ds.get("PatientPosition", "").startswith("FF") else z, 4)
        pixels = _slice_pixels(src.pixels, i, seed)
        ds.SmallestImagePixelValue = int(pixels.min())
        ds.LargestImagePixelValue = int(pixels.max())
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        name = f"CT{i + 1:05d}.dcm"
        ds.save_as(out_dir / name, enforce_file_format=True)
        names.append(name)
    return names


def _cache_key(count: int, seed: int, study_uid: str | None, source: str) -> str:
    study = hashlib.sha1(study_uid.encode()).hexdigest()[:10] if study_uid else "auto"
    return f"ct-{source}-n{count}-s{seed}-st{study}-v{GENERATOR_VERSION}"


def cached_ct_series(
    count: int = 300,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    source: str = "auto",
    cache_dir: Path = CACHE_DIR,
) -> list[Path]:
    """Paths of the cached series for these parameters, generating it once; treat the files as read-only."""
    if count < 1:
        raise ValueError("count must be >= 1")
    src = load_source_slice(source, cache_dir)
    key = _cache_key(count, seed, study_uid, src.name)
    final = cache_dir / "ctseries" / key
    marker = final.parent / f"{key}.json"  # beside the folder: the folder holds only DICOM files
    if marker.exists() and final.is_dir():
        names = json.loads(marker.read_text())["files"]
        paths = [final / n for n in names]
        if all(p.exists() for p in paths):
            return paths
    marker.unlink(missing_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        study = study_uid or _uid("study", seed, count, src.name)
        names = _write_series(src, tmp, count, seed, study)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent generator won the race; its files are identical
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"files": names, "source": src.name, "count": count, "seed": seed, "study_uid": study,
            "generator_version": GENERATOR_VERSION}
    tmp_marker = marker.with_name(f".{key}.{os.getpid()}.json")
    tmp_marker.write_text(json.dumps(info, indent=1))
    tmp_marker.replace(marker)
    return [final / n for n in names]


def make_ct_series(
    out_dir: Path,
    count: int = 300,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    source: str = "auto",
) -> list[Path]:
    """Write ``count`` realistic 512² 12-bit CT slices of one series into ``out_dir``; return their paths.

    Files are Explicit VR Little Endian Part-10, named ``CT00001.dcm``… in InstanceNumber order, with
    deterministic UIDs (same parameters → same UIDs). Generated once into the cache, then copied.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cached in cached_ct_series(count, seed=seed, study_uid=study_uid, source=source):
        target = out_dir / cached.name
        if target.resolve() != cached.resolve():
            shutil.copyfile(cached, target)
        paths.append(target)
    return paths


def htj2k_ratio(paths: list[Path], sample: int = 10) -> float:
    """Lossless HTJ2K ratio (pixel bytes / codestream bytes) over up to ``sample`` slices (imagecodecs)."""
    import imagecodecs

    step = max(1, len(paths) // sample)
    raw = coded = 0
    for path in paths[::step][:sample]:
        pixels = pydicom.dcmread(path).pixel_array
        raw += pixels.nbytes
        coded += len(imagecodecs.htj2k_encode(pixels))
    return raw / coded


def main(argv: list[str] | None = None) -> int:
    """CLI: write a CT series into OUT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--study-uid", default=None)
    parser.add_argument("--source", default="auto", choices=[*SOURCES, "auto"])
    parser.add_argument("--ratio", action="store_true", help="also report the lossless HTJ2K ratio")
    args = parser.parse_args(argv)
    paths = make_ct_series(args.out, args.count, seed=args.seed, study_uid=args.study_uid,
                           source=args.source)
    size = sum(p.stat().st_size for p in paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    print(f"{len(paths)} slices, {size / 1e6:.1f} MB in {args.out}")
    print(f"StudyInstanceUID  {first.StudyInstanceUID}\nSeriesInstanceUID {first.SeriesInstanceUID}")
    if args.ratio:
        print(f"HTJ2K lossless ratio {htj2k_ratio(paths):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
