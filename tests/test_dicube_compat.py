"""Tests for dcbnode.dcbs.dicube_compat against volumes written by the real DiCube 0.3.0.

How the tests get DiCube: dcbnode must not depend on ``dicube``, so it is *not* installed in the test
environment (which would also hide an accidental ``import dicube``).  It lives in its own virtualenv that
sees the main site-packages (pydicom, numpy, zstandard; it adds only dicube and spacetransformer-core):

    scripts/install-test-deps   (creates ~/.cache/dcbnode/dicube-venv with dicube==0.3.0)

The tests run that interpreter (``$DICUBE_PYTHON`` overrides the path) in a subprocess to write volumes
from real DICOM series and to dump what DiCube's own readers return for each frame.  Without it the tests
skip, except under CI (``CI`` set), where a missing DiCube is a failure.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames, parse_basic_offsets
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless

from dcbnode.dcbs.dicube_compat import DiCubeReader, is_dicube_file
from dcbnode.dcbs.errors import DcbsFormatError

DICUBE_PYTHON = os.environ.get("DICUBE_PYTHON",
                               os.path.expanduser("~/.cache/dcbnode/dicube-venv/bin/python"))
INSTALL_HINT = "run scripts/install-test-deps (it creates the DiCube virtualenv)"

#: Run by DiCube's interpreter: write the volume, then dump DiCube's two readers' output per frame.
DICUBE_SCRIPT = """
import sys, pathlib, warnings
import numpy as np
import dicube
from dicube.dicom import DcbStreamingReader
warnings.simplefilter("ignore")
src, out = sys.argv[1], pathlib.Path(sys.argv[2])
dicube.save(dicube.load_from_dicom_folder(src), str(out / "volume.dcbs"))
np.save(out / "raw.npy", np.asarray(dicube.load(str(out / "volume.dcbs")).raw_image))
with DcbStreamingReader(str(out / "volume.dcbs")) as reader:
    for i in range(reader.get_frame_count()):
        (out / f"dicube_{i}.dcm").write_bytes(reader.get_dicom_for_frame(i))
"""

SERIES = ("ct_ge", "ct_small", "mr_quantized", "u8_mono1")


@pytest.fixture(scope="session")
def dicube_python() -> str:
    """Return the interpreter that has dicube 0.3.0, or skip (fail under CI) without it."""
    try:
        result = subprocess.run([DICUBE_PYTHON, "-c", "import dicube; print(dicube.__version__)"],
                                capture_output=True, text=True, timeout=120, check=False)
        problem = "" if result.stdout.strip() == "0.3.0" else result.stdout + result.stderr
    except OSError as exc:
        problem = str(exc)
    if problem:
        message = f"dicube 0.3.0 not usable via {DICUBE_PYTHON} ({problem.strip()[-200:]}); {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DICUBE_PYTHON


def _save(ds: Dataset, path: Path, pixels: np.ndarray, instance: int) -> None:
    """Write ``ds`` with ``pixels`` as a distinct Explicit VR Little Endian instance."""
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.InstanceNumber = instance
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1443.99.{instance}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for tag in (0x00280106, 0x00280107):  # smallest/largest pixel value: stale once pixels change
        ds.pop(tag, None)
    ds.save_as(path, enforce_file_format=True)


def _make_series(name: str, folder: Path) -> None:
    """Write one of the SERIES as a folder of DICOM files."""
    folder.mkdir()
    if name == "ct_ge":  # a real GE CT series: signed, intercept -1024, padding, private tags and SQ
        source = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/98892001/CT5N"
        for path in source.iterdir():
            shutil.copy(path, folder / path.name)
    elif name == "ct_small":  # file names out of InstanceNumber order, per-slice values everywhere
        for k, instance in enumerate((3, 1, 5, 2, 4)):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            pixels = (ds.pixel_array + 10 * instance).astype(np.int16)
            ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 2.5 * instance]
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.1443.98.{instance}"
            ds.SourceImageSequence = Sequence([item])
            ds.add_new(0x00091010, "OB", bytes([instance, 0]))
            if instance == 5:
                del ds.ImageComments
            else:
                ds.ImageComments = f"slice {instance}"
            _save(ds, folder / "abcde"[k], pixels, instance)
    elif name == "mr_quantized":  # slope 3.774114: DiCube re-quantizes the baked values to uint16
        for instance in (1, 2):
            ds = pydicom.dcmread(get_testdata_file("MR2_J2KR.dcm"))
            _save(ds, folder / f"{instance}.dcm", ds.pixel_array[:150, :201] + instance, instance)
    else:  # 8-bit, odd size (odd-length codestreams and pixel data), MONOCHROME1
        for instance in (1, 2, 3):
            ds = pydicom.dcmread(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
            ds.PhotometricInterpretation = "MONOCHROME1"
            _save(ds, folder / f"{instance}.dcm", ds.pixel_array[:15, :17] + instance, instance)


@pytest.fixture(scope="module", params=SERIES)
def volume(request: pytest.FixtureRequest, dicube_python: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Path:
    """Return a folder holding ``volume.dcbs`` written by DiCube and DiCube's output for each frame."""
    root = tmp_path_factory.mktemp(request.param)
    _make_series(request.param, root / "series")
    # DiCube reads files in set order; a fixed hash seed makes that order, and so the volume, repeatable.
    subprocess.run([dicube_python, "-c", DICUBE_SCRIPT, str(root / "series"), str(root)], check=True,
                   timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    return root


def _pixels(data: bytes) -> np.ndarray:
    """Decode Part-10 bytes with pydicom; HTJ2K through pylibjpeg-openjpeg, as a viewer would."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.pixel_array_options(decoding_plugin="pylibjpeg")
    return ds.pixel_array


def _fragment(data: bytes) -> tuple[tuple[int, ...], bytes]:
    """Return the Basic Offset Table and the single fragment of encapsulated Part-10 bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    offsets = tuple(parse_basic_offsets(ds.PixelData))
    frames = list(generate_fragmented_frames(ds.PixelData, number_of_frames=1))
    assert len(frames) == 1 and len(frames[0]) == 1, "one frame of one fragment"
    return offsets, frames[0][0]


def test_pixels_equal_dicube_for_every_frame(volume: Path) -> None:
    raw = np.load(volume / "raw.npy")
    with DiCubeReader(volume / "volume.dcbs") as reader:
        assert reader.get_frame_count() == len(raw) == len(list(volume.glob("dicube_*.dcm")))
        for i in range(reader.get_frame_count()):
            theirs = (volume / f"dicube_{i}.dcm").read_bytes()
            ours, native = reader.get_dicom_for_frame(i), reader.get_dicom_for_frame(i, True)
            expected = _pixels(theirs)
            assert np.array_equal(expected, raw[i])
            for data in (ours, native):
                got = _pixels(data)
                assert got.dtype == expected.dtype and np.array_equal(got, expected), f"frame {i}"
            ds, reference = pydicom.dcmread(io.BytesIO(ours)), pydicom.dcmread(io.BytesIO(theirs))
            assert (ds.SOPInstanceUID, ds.InstanceNumber) == (reference.SOPInstanceUID,
                                                             reference.InstanceNumber)
            assert (ds.BitsAllocated, ds.PixelRepresentation) == (reference.BitsAllocated,
                                                                 reference.PixelRepresentation)


def test_htj2k_output_splices_dicube_codestream(volume: Path) -> None:
    with DiCubeReader(volume / "volume.dcbs") as reader:
        for i in range(reader.get_frame_count()):
            data = reader.get_dicom_for_frame(i)
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.file_meta.TransferSyntaxUID == HTJ2KLossless
            assert ds.file_meta.ImplementationClassUID == "1.2.826.0.1.3680043.10.1443.1.0"
            assert ds.file_meta.ImplementationVersionName == "DCBNODE_010"
            assert ds["PixelData"].is_undefined_length
            offsets, fragment = _fragment(data)
            assert offsets == (0,) and len(fragment) % 2 == 0
            # DiCube encapsulates its stored codestream too: the fragments must be byte-identical.
            assert fragment == _fragment((volume / f"dicube_{i}.dcm").read_bytes())[1]
            assert fragment.rstrip(b"\0").endswith(b"\xff\xd9")


def test_native_output(volume: Path) -> None:
    with DiCubeReader(volume / "volume.dcbs") as reader:
        ds = pydicom.dcmread(io.BytesIO(reader.get_dicom_for_frame(0, force_uncompressed=True)))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.BitsAllocated, ds["PixelData"].VR) in ((8, "OB"), (16, "OW"))
    assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8 + (ds.Rows * ds.Columns) % 2


def test_output_is_deterministic(volume: Path) -> None:
    with DiCubeReader(volume / "volume.dcbs") as first, DiCubeReader(volume / "volume.dcbs") as second:
        for i in reversed(range(first.get_frame_count())):
            for native in (False, True):
                data = first.get_dicom_for_frame(i, native)
                assert data == first.get_dicom_for_frame(i, native) == second.get_dicom_for_frame(i, native)


def _datasets(volume: Path) -> list[Dataset]:
    with DiCubeReader(volume / "volume.dcbs") as reader:
        return [pydicom.dcmread(io.BytesIO(reader.get_dicom_for_frame(i)))
                for i in range(reader.get_frame_count())]


def test_metadata_where_dicube_is_wrong(volume: Path) -> None:
    datasets = _datasets(volume)
    name = volume.name.rstrip("0123456789")
    for ds in datasets:
        assert ds.SamplesPerPixel == 1 and "LargestImagePixelValue" not in ds
        for element in ds.iterall():
            if element.VR == "DS" and element.value is not None:  # DiCube writes 20-character DS values
                values = element.value if element.VM > 1 else [element.value]
                assert all(len(str(v)) <= 16 for v in values), element
    if name == "ct_ge":  # baked intercept -1024: padding -2000 becomes -3024; shared private SQ kept
        assert [ds.PixelPaddingValue for ds in datasets] == [-3024] * 5
        assert all(ds[0x00491001].VM == 1 and ds.RescaleIntercept == 0 for ds in datasets)
        assert [ds.InstanceNumber for ds in datasets] == [6, 7, 8, 9, 10]
    elif name == "ct_small":
        assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4, 5]
        # A tag missing from the last file DiCube read is stored out of order (dropped here); otherwise
        # DiCube's "None" placeholder marks the slices that lack it.  Either way, never another slice's.
        comments = [ds.get("ImageComments") for ds in datasets]
        assert comments[4] is None
        assert comments[:4] in (["slice 1", "slice 2", "slice 3", "slice 4"], [None] * 4)
        # DiCube left these per-slice values in random file order: they are dropped, never misattributed
        assert not any("SourceImageSequence" in ds or 0x00091010 in ds for ds in datasets)
    elif name == "mr_quantized":
        assert datasets[0].RescaleSlope == pytest.approx(3.774114 / 1771, rel=1e-3)
        assert "PixelPaddingValue" not in datasets[0]
    else:  # DiCube forces MONOCHROME2 though it did not invert the pixels; no rescale was ever present
        assert all(ds.PhotometricInterpretation == "MONOCHROME1" for ds in datasets)
        assert all("RescaleSlope" not in ds and ds.BitsStored == 8 for ds in datasets)


def test_is_dicube_file(volume: Path, tmp_path: Path) -> None:
    assert is_dicube_file(volume / "volume.dcbs")
    assert not is_dicube_file(volume / "dicube_0.dcm")
    assert not is_dicube_file(tmp_path / "missing.dcbs")


def test_dicube_is_not_imported(volume: Path) -> None:
    code = ("import sys; from dcbnode.dcbs.dicube_compat import DiCubeReader; "
            f"DiCubeReader({str(volume / 'volume.dcbs')!r}).get_dicom_for_frame(0); "
            "assert 'dicube' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parent.parent)


Edit = Callable[[bytearray, list], None]


def _damaged(volume: Path, tmp_path: Path, edit: Edit) -> Path:
    """Write a copy of the volume changed by ``edit(data, header_fields)`` and return its path."""
    data = bytearray((volume / "volume.dcbs").read_bytes())
    header = list(struct.unpack_from("<8sI13Q", data))
    edit(data, header)
    path = tmp_path / "damaged.dcbs"
    path.write_bytes(bytes(data))
    return path


def _frame_tables(header: list) -> tuple[int, int, int]:
    """Return (offsets table offset, lengths table offset, frame count) from a volume's header fields."""
    return header[10], header[12], header[14]


def test_truncated_volume_raises(volume: Path, tmp_path: Path) -> None:
    size = (volume / "volume.dcbs").stat().st_size
    for keep in (size - 1, size // 2, 100, 0):
        path = _damaged(volume, tmp_path, lambda data, header, keep=keep: data.__delitem__(slice(keep, None)))
        with pytest.raises(DcbsFormatError):
            DiCubeReader(path)


def test_corrupted_frame_tables_raise(volume: Path, tmp_path: Path) -> None:
    def shift_offset(data: bytearray, header: list) -> None:
        offsets_at, _, count = _frame_tables(header)
        at = offsets_at + 8 * (count - 1)
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] - 2)

    def duplicate_frame(data: bytearray, header: list) -> None:
        offsets_at, lengths_at, _ = _frame_tables(header)
        data[offsets_at + 8:offsets_at + 16] = data[offsets_at:offsets_at + 8]
        data[lengths_at + 8:lengths_at + 16] = data[lengths_at:lengths_at + 8]

    def bad_count(data: bytearray, header: list) -> None:
        struct.pack_into("<Q", data, 108, header[14] + 1)

    for edit in (shift_offset, duplicate_frame, bad_count):
        with pytest.raises(DcbsFormatError):
            DiCubeReader(_damaged(volume, tmp_path, edit))

    def shorten_last_frame(data: bytearray, header: list) -> None:  # passes the table checks
        _, lengths_at, count = _frame_tables(header)
        at = lengths_at + 8 * (count - 1)
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] - 3)

    with DiCubeReader(_damaged(volume, tmp_path, shorten_last_frame)) as reader:
        reader.get_dicom_for_frame(0)
        with pytest.raises(DcbsFormatError, match="frame"):
            reader.get_dicom_for_frame(reader.get_frame_count() - 1)


def test_corrupted_header_and_metadata_raise(volume: Path, tmp_path: Path) -> None:
    def set_bytes(at: int, value: bytes) -> Edit:
        return lambda data, header: data.__setitem__(slice(at, at + len(value)), value)

    # Header: magic (8 bytes), version (4), then (offset, length) u64 pairs; metadata is the 2nd pair.
    meta_at, pixel_header_at = struct.unpack_from("<16xQ24xQ", (volume / "volume.dcbs").read_bytes(), 12)
    edits = {"magic": set_bytes(0, b"DCMCUBEA"), "version": set_bytes(8, b"\x02"),
             "zstd": set_bytes(meta_at, b"\0\0\0\0"), "json": set_bytes(pixel_header_at, b"[")}
    for what, edit in edits.items():
        with pytest.raises(DcbsFormatError, match=what if what in ("magic", "version") else None):
            DiCubeReader(_damaged(volume, tmp_path, edit))
    with DiCubeReader(volume / "volume.dcbs") as reader, pytest.raises(IndexError):
        reader.get_dicom_for_frame(reader.get_frame_count())
