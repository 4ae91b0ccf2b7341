"""Every DICOM file of pydicom's test data through a real DCBS volume and back, in every output syntax.

The file list is what ``pydicom.data.get_testdata_files("*")`` returns, built without its online part:
pydicom's own ``test_files/*`` plus the files the installed ``pydicom-data`` package registers.  Calling
``get_testdata_files`` itself would try to download the few files neither package holds (tens of seconds
of retries offline), so the two local sources are listed directly and nothing is ever downloaded.

Each file is appended to a fresh volume (``Volume.open(create=True)`` + ``append_instance``), the volume
is closed and reopened read-only, the instance is found with ``live_instances`` and rebuilt with
``rebuild`` in every syntax ``available_syntaxes`` offers.  Every rebuilt file must decode to the same
pixels as the original (pydicom) and carry the same elements (``tests/faithful.py``).  Files that are not
valid instances must be refused with :class:`dcbs.InvalidDatasetError`; ``EXPECTED_REJECTIONS`` lists them
with their reasons, so a new rejection and a lost one both fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from faithful import element_differences, pixels_equal, read
from pydicom.data import data_manager
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import HTJ2K, UID, ExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL

from dcbnode import dcbs
from dcbnode.dcbs.record import Codec, PixelSource
from dcbnode.dcbs.syntaxes import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, is_lossy_syntax

#: Extensions of the non-DICOM files that sit beside the test datasets.
NON_DICOM_SUFFIXES = frozenset({".py", ".txt", ".json", ".dump", ".gz", ".icc"})

#: Files that are not storable instances: name -> (exception type, substring of ``reason``).
#: Compressed files no installed decoder reads: taken as sent, served in their own syntax only.
KEPT_AS_RECEIVED = frozenset({"JPEG2000-embedded-sequence-delimiter.dcm"})

EXPECTED_REJECTIONS: dict[str, tuple[type[dcbs.InvalidDatasetError], str]] = {
    # Cut short: pydicom reads them silently, the library checks every top-level length against the stream.
    "MR_truncated.dcm": (dcbs.InvalidDatasetError,
                         "dataset is truncated: element (7FE0,0010) needs 8192 bytes, 8130 remain"),
    "rtplan_truncated.dcm": (dcbs.InvalidDatasetError,
                             "dataset is truncated: element (300A,00B0) needs 976 bytes, 711 remain"),
    # Not parseable: no preamble, no file meta and a stray first byte; pydicom reads one absurd element.
    "no_meta.dcm": (dcbs.InvalidDatasetError, "dataset is truncated: element (0820,0500)"),
    # Missing or invalid UIDs.
    "JPEGLSNearLossless_08.dcm": (dcbs.InvalidDatasetError, "StudyInstanceUID is missing"),
    "JPEGLSNearLossless_16.dcm": (dcbs.InvalidDatasetError, "StudyInstanceUID is missing"),
    "SC_rgb_jls_lossy_line.dcm": (dcbs.InvalidDatasetError, "StudyInstanceUID is missing"),
    "SC_rgb_jls_lossy_sample.dcm": (dcbs.InvalidDatasetError, "StudyInstanceUID is missing"),
    "UN_sequence.dcm": (dcbs.InvalidDatasetError, "SOPClassUID is missing"),
    "empty_charset_LEI.dcm": (dcbs.InvalidDatasetError, "SOPClassUID is missing"),
    "emri_small_jpeg_2k_lossless_too_short.dcm": (dcbs.InvalidDatasetError, "has no Sequence Delimitation Item"),
    "meta_missing_tsyntax.dcm": (dcbs.InvalidDatasetError, "SOPClassUID is missing"),
    "nested_priv_SQ.dcm": (dcbs.InvalidDatasetError, "SOPClassUID is missing"),
    "no_meta_group_length.dcm": (dcbs.InvalidDatasetError, "SOPClassUID is missing"),
    "priv_SQ.dcm": (dcbs.InvalidDatasetError, "SOPClassUID is missing"),
    "bad_sequence.dcm": (dcbs.InvalidDatasetError, "SOPInstanceUID is not a valid UID"),
    # Image attributes that are not numbers.
    "badVR.dcm": (dcbs.InvalidDatasetError, "NumberOfFrames is not a number"),
}

def _test_files() -> list[Path]:
    """pydicom's ``test_files/*`` plus the installed pydicom-data files: no download, non-DICOM skipped."""
    local = Path(data_manager.DATA_ROOT, "test_files").glob("*")
    source = data_manager.external_data_sources().get("pydicom-data")
    external = source.get_paths("*", data_manager.DataTypes.DATASET) if source is not None else []
    files = [Path(p) for p in (*local, *external)]
    return sorted((p for p in files if p.is_file() and p.suffix not in NON_DICOM_SUFFIXES), key=lambda p: p.name)


FILES = _test_files()
BY_NAME = {path.name: path for path in FILES}


def _file_param(path: Path) -> object:
    return pytest.param(path, id=path.name)


@contextlib.contextmanager
def stored_instance(source: Path | bytes, directory: Path) -> Iterator[dcbs.StoredInstance]:
    """Append ``source`` to a new volume in ``directory``, close it, reopen it read-only, yield the record."""
    encoded = dcbs.encode_instance(source)
    path = directory / f"{encoded.meta.sop_instance_uid}.dcbs"
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        dcbs.append_instance(volume, encoded)
    with dcbs.Volume.open(path) as volume:
        live = dcbs.live_instances(volume)
        assert list(live) == [encoded.meta.sop_instance_uid]
        yield live[encoded.meta.sop_instance_uid]


def rebuilt_part10(stored: dcbs.StoredInstance, syntax: str) -> bytes:
    """The stored instance as a Part-10 file in ``syntax``."""
    return dcbs.rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10()


def original_dataset(path: Path, stored: dcbs.StoredInstance) -> Dataset:
    """The original, parsed; files without file meta get the syntax they were read in, so pydicom decodes."""
    dataset = read(path)
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = UID(stored.meta.received_syntax)
    return dataset


def test_file_list_is_complete() -> None:
    """Both sources are present, names are unique, and every expected rejection names a listed file."""
    assert len(FILES) >= 140, f"only {len(FILES)} test files found: is pydicom-data installed?"
    assert len(BY_NAME) == len(FILES), "two test files share a name: ids would be ambiguous"
    assert {"CT_small.dcm", "emri_small.dcm", "color3d_jpeg_baseline.dcm"} <= set(BY_NAME)
    assert set(EXPECTED_REJECTIONS) <= set(BY_NAME), set(EXPECTED_REJECTIONS) - set(BY_NAME)


@pytest.mark.parametrize("path", [_file_param(p) for p in FILES])
def test_roundtrip(path: Path, tmp_path: Path) -> None:
    """Stored and rebuilt in every available syntax: same elements, same pixels; or refused as expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test files are full of deliberately invalid values
        if path.name in EXPECTED_REJECTIONS:
            _check_rejected(path)
        else:
            _check_roundtrip(path, tmp_path)


def _check_rejected(path: Path) -> None:
    kind, reason = EXPECTED_REJECTIONS[path.name]
    with pytest.raises(dcbs.InvalidDatasetError) as caught:
        dcbs.encode_instance(path)
    assert isinstance(caught.value, kind), f"{type(caught.value).__name__}: {caught.value}"
    assert reason in caught.value.reason
    assert caught.value.source == str(path) and path.name in str(caught.value)


def _check_roundtrip(path: Path, tmp_path: Path) -> None:
    with stored_instance(path, tmp_path) as stored:
        original = original_dataset(path, stored)
        syntaxes = dcbs.available_syntaxes(stored.meta)
        if path.name in KEPT_AS_RECEIVED:
            assert stored.meta.image is not None and not stored.meta.image.decodable
            assert syntaxes == [stored.meta.received_syntax]
        else:
            assert ExplicitVRLittleEndian in syntaxes
        for syntax in syntaxes:
            rebuilt = read(rebuilt_part10(stored, syntax))
            where = f"{path.name} as {syntax.name}"
            assert rebuilt.file_meta.TransferSyntaxUID == syntax, where
            assert rebuilt.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID, where
            assert rebuilt.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME, where
            assert element_differences(original, rebuilt) == [], where
            image = stored.meta.image
            if image is not None and image.source == PixelSource.ORIGINAL and syntax == stored.meta.received_syntax:
                # Kept codestreams come back byte for byte: no need (and no right) to decode them.
                assert rebuilt.PixelData == original.PixelData, where
                continue
            if syntax == HTJ2KLossless and image is not None:
                _check_htj2k_encapsulation(rebuilt, image.number_of_frames, where)
            assert pixels_equal(original, rebuilt), where


def _check_htj2k_encapsulation(rebuilt: Dataset, frames: int, where: str) -> None:
    """One fragment per frame, a Basic Offset Table with one entry per frame, no Extended Offset Table."""
    fragmented = list(generate_fragmented_frames(rebuilt.PixelData, number_of_frames=frames))
    assert [len(fragments) for fragments in fragmented] == [1] * frames, where
    assert int.from_bytes(rebuilt.PixelData[4:8], "little") == 4 * frames, where
    assert "ExtendedOffsetTable" not in rebuilt, where


@pytest.mark.parametrize("cut", [
    pytest.param(1000, id="inside-an-element-value"),
    pytest.param(39206 - 2000, id="inside-pixel-data"),
    pytest.param(39206 - 1, id="inside-trailing-padding-value"),
    pytest.param(39068 + 8, id="inside-trailing-padding-length"),
    pytest.param(39068 + 4, id="inside-trailing-padding-tag"),
])
def test_cut_stream_is_refused(cut: int) -> None:
    """A Part-10 stream cut anywhere (here CT_small.dcm, 39206 bytes, Pixel Data ending at 39068) is refused."""
    data = BY_NAME["CT_small.dcm"].read_bytes()
    assert len(data) == 39206
    with pytest.raises(dcbs.InvalidDatasetError, match=r"truncated|cannot parse"):
        dcbs.encode_instance(data[:cut])


# -- HTJ2K output read by a second, independent decoder -----------------------------------------------------

#: (file, what it exercises): grey 16-bit signed, 8-bit RGB, multi-frame grey and colour.
GDCM_FILES = {
    "CT_small.dcm": "grey 16-bit signed",
    "MR_small.dcm": "grey 16-bit signed",
    "SC_rgb.dcm": "8-bit RGB, native input",
    "US1_J2KR.dcm": "8-bit RGB, J2K lossless input",
    "emri_small.dcm": "multi-frame 16-bit grey",
    "SC_rgb_rle_2frame.dcm": "multi-frame 8-bit RGB, RLE input",
}
_GDCM_DTYPES = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16}


def gdcm_pixels(path: Path) -> tuple[np.ndarray, str]:
    """Decode ``path`` with GDCM's own reader (pydicom's GDCM plugin has no HTJ2K): (pixels, photometric)."""
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), f"GDCM cannot read {path}"
    image = reader.GetImage()
    dims = [image.GetDimension(i) for i in range(image.GetNumberOfDimensions())]
    columns, rows, frames = dims[0], dims[1], dims[2] if len(dims) == 3 else 1
    samples = image.GetPixelFormat().GetSamplesPerPixel()
    dtype = _GDCM_DTYPES[image.GetPixelFormat().GetScalarTypeAsString()]
    buffer = image.GetBuffer().encode("utf-8", "surrogateescape")
    shape = [rows, columns] if frames == 1 else [frames, rows, columns]
    if samples > 1:
        shape.append(samples)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape), image.GetPhotometricInterpretation().GetString()


@pytest.mark.parametrize("name", list(GDCM_FILES))
def test_htj2k_output_decodes_equal_with_gdcm(name: str, tmp_path: Path) -> None:
    """HTJ2K Lossless output, read by GDCM rather than pydicom/OpenJPEG, gives the original pixels."""
    path = BY_NAME[name]
    with stored_instance(path, tmp_path) as stored:
        original = original_dataset(path, stored)
        output = tmp_path / "htj2k.dcm"
        output.write_bytes(rebuilt_part10(stored, HTJ2KLossless))
    rebuilt = pydicom.dcmread(output)
    assert rebuilt.file_meta.TransferSyntaxUID == HTJ2KLossless
    if original.SamplesPerPixel == 3:
        assert original.PhotometricInterpretation in ("RGB", "YBR_RCT")  # J2K lossless input carries RCT
        assert rebuilt.PhotometricInterpretation == "YBR_RCT"  # the codestreams use the reversible transform
    else:
        assert rebuilt.PhotometricInterpretation == original.PhotometricInterpretation
    if "signed" in GDCM_FILES[name]:
        assert original.PixelRepresentation == 1
    if "multi-frame" in GDCM_FILES[name]:
        assert int(original.NumberOfFrames) > 1
    pixels, _ = gdcm_pixels(output)
    assert pixels.dtype == original.pixel_array.dtype
    assert np.array_equal(pixels, original.pixel_array)


# -- lossy input is never re-encoded --------------------------------------------------------------------------

LOSSY_FILES = ("SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "SC_rgb_small_odd_jpeg.dcm", "JPEG2000.dcm",
               "US1_J2KI.dcm", "MR2_J2KI.dcm", "JPGExtended.dcm")


@pytest.mark.parametrize("name", LOSSY_FILES)
def test_lossy_input_comes_back_in_its_syntax_byte_for_byte(name: str, tmp_path: Path) -> None:
    """JPEG baseline/extended and lossy J2K: original syntax first, Pixel Data identical, never HTJ2K."""
    path = BY_NAME[name]
    original = read(path)
    assert is_lossy_syntax(original.file_meta.TransferSyntaxUID)
    volume_path = tmp_path / "lossy.dcbs"
    with dcbs.Volume.open(volume_path, writable=True, create=True) as volume:
        dcbs.append_instance(volume, dcbs.encode_instance(path))
    with dcbs.DcbStreamingReader(volume_path) as reader:
        stored = reader.get_instance(0)
        assert {entry.codec for entry in stored.meta.frames} == {Codec.ORIGINAL}
        syntaxes = dcbs.available_syntaxes(stored.meta)
        assert syntaxes[0] == original.file_meta.TransferSyntaxUID
        assert HTJ2KLossless not in syntaxes
        rebuilt = read(reader.get_dicom_for_frame(0))
    assert rebuilt.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert rebuilt["PixelData"].VR == original["PixelData"].VR
    assert rebuilt.PixelData == original.PixelData
    assert element_differences(original, rebuilt) == []


# -- determinism -------------------------------------------------------------------------------------------------

DETERMINISM_FILES = ("CT_small.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_implicit.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                     "liver.dcm", "rtplan.dcm", "OBXXXX1A_2frame.dcm")


@pytest.mark.parametrize("name", DETERMINISM_FILES)
def test_rebuild_is_deterministic(name: str, tmp_path: Path) -> None:
    """The same input stored twice, in two volumes, rebuilds to identical bytes in every syntax."""
    path = BY_NAME[name]
    with stored_instance(path, tmp_path / "a") as first, stored_instance(path, tmp_path / "b") as second:
        assert first.volume.volume_id != second.volume.volume_id
        first_record = first.volume.read_exact(first.location.offset, first.location.length)
        assert first_record == second.volume.read_exact(second.location.offset, second.location.length)
        for syntax in dcbs.available_syntaxes(first.meta):
            once = rebuilt_part10(first, syntax)
            assert once == rebuilt_part10(first, syntax), syntax.name
            assert once == rebuilt_part10(second, syntax), syntax.name


# -- force_uncompressed: plain pydicom, no pixel plugin --------------------------------------------------------

NATIVE_FILES = ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm", "liver.dcm",
                "emri_small_RLE.dcm", "US1_J2KI.dcm", "SC_rgb_rle_32bit.dcm", "examples_ybr_color.dcm")

#: Run in a fresh interpreter where no pixel-data plugin can be imported: only numpy remains.
NO_PLUGIN_SCRIPT = textwrap.dedent("""
    import hashlib, importlib.abc, sys
    BLOCKED = {"gdcm", "pylibjpeg", "openjpeg", "libjpeg", "rle", "imagecodecs", "jpeg_ls", "pyjpegls"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless
    for uid in (JPEG2000Lossless, JPEGBaseline8Bit):
        assert not get_decoder(uid).available_plugins, uid
    for path in sys.argv[1:]:
        ds = pydicom.dcmread(path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed, path
        array = ds.pixel_array
        print(path, array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
""")


def _digest(array: np.ndarray) -> str:
    """What the subprocess prints for one pixel array."""
    return f"{array.dtype.str} {array.shape} {hashlib.sha256(array.tobytes()).hexdigest()}"


def test_force_uncompressed_needs_no_pixel_plugin(tmp_path: Path) -> None:
    """``get_dicom_for_frame(i, force_uncompressed=True)`` is native Explicit VR LE that bare pydicom reads."""
    volume_path = tmp_path / "mixed.dcbs"
    with dcbs.Volume.open(volume_path, writable=True, create=True) as volume:
        for name in NATIVE_FILES:
            dcbs.append_instance(volume, dcbs.encode_instance(BY_NAME[name]))
    expected: dict[str, str] = {}
    with dcbs.DcbStreamingReader(volume_path) as reader:
        assert reader.get_frame_count() == len(NATIVE_FILES)
        by_uid = {read(BY_NAME[name]).SOPInstanceUID: name for name in NATIVE_FILES}
        for index in range(reader.get_frame_count()):
            name = by_uid[reader.get_instance(index).meta.sop_instance_uid]
            blob = reader.get_dicom_for_frame(index, force_uncompressed=True)
            assert read(blob).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            output = tmp_path / name
            output.write_bytes(blob)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected[str(output)] = _digest(read(BY_NAME[name]).pixel_array)
    result = subprocess.run([sys.executable, "-c", NO_PLUGIN_SCRIPT, *expected], capture_output=True, text=True,
                            timeout=120, check=False, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert printed == expected


# -- HTJ2K input (no such file exists offline: made here with imagecodecs/OpenJPH) ----------------------------


def htj2k_part10(frames: list[np.ndarray], syntax: str, photometric: str, bits_stored: int) -> bytes:
    """A Secondary Capture instance whose Pixel Data are the given frames as HTJ2K codestreams."""
    import imagecodecs
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    first = frames[0]
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in range(3))
    ds.Modality = "OT"
    ds.SamplesPerPixel = 3 if first.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = first.shape[:2]
    ds.BitsAllocated = first.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(first.dtype.kind == "i")
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(f, rgb=photometric == "YBR_RCT") for f in frames])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


_RNG = np.random.default_rng(2024)
HTJ2K_INPUTS = {
    "grey-u12": ([_RNG.integers(0, 4096, (40, 56), dtype=np.uint16)], "MONOCHROME2", 12),
    "grey-s16": ([_RNG.integers(-30000, 30000, (33, 47)).astype(np.int16)], "MONOCHROME2", 16),
    "multi-frame-u8": ([_RNG.integers(0, 256, (24, 24), dtype=np.uint8) for _ in range(4)], "MONOCHROME2", 8),
    "rgb-rct": ([_RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)], "YBR_RCT", 8),
}


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL], ids=["htj2k", "htj2k-rpcl"])
@pytest.mark.parametrize("kind", list(HTJ2K_INPUTS))
def test_htj2k_lossless_input_is_kept_as_is(kind: str, syntax: UID, tmp_path: Path) -> None:
    """HTJ2K Lossless input: the codestreams are stored and served unchanged; native output is exact."""
    frames, photometric, bits_stored = HTJ2K_INPUTS[kind]
    data = htj2k_part10(frames, syntax, photometric, bits_stored)
    original = read(data)
    received = [b"".join(f) for f in generate_fragmented_frames(original.PixelData, number_of_frames=len(frames))]
    with stored_instance(data, tmp_path) as stored:
        assert stored.meta.image is not None and stored.meta.image.source == PixelSource.HTJ2K
        assert list(stored.iter_frames()) == received
        htj2k = read(rebuilt_part10(stored, HTJ2KLossless))
        served = [b"".join(f) for f in generate_fragmented_frames(htj2k.PixelData, number_of_frames=len(frames))]
        assert [s[: len(r)] for s, r in zip(served, received, strict=True)] == received
        native = read(rebuilt_part10(stored, ExplicitVRLittleEndian))
    assert element_differences(original, htj2k) == []
    assert element_differences(original, native) == []
    expected = np.stack(frames) if len(frames) > 1 else frames[0]
    assert np.array_equal(native.pixel_array, expected)
    assert native.PhotometricInterpretation == ("RGB" if photometric == "YBR_RCT" else photometric)


def test_htj2k_lossy_syntax_input_is_kept_original(tmp_path: Path) -> None:
    """Input labelled HTJ2K (lossy allowed, .203) is treated as lossy: original syntax, bytes unchanged."""
    data = htj2k_part10(HTJ2K_INPUTS["grey-u12"][0], HTJ2K, "MONOCHROME2", 12)
    with stored_instance(data, tmp_path) as stored:
        assert {entry.codec for entry in stored.meta.frames} == {Codec.ORIGINAL}
        assert dcbs.available_syntaxes(stored.meta)[0] == HTJ2K
        assert read(rebuilt_part10(stored, HTJ2K)).PixelData == read(data).PixelData


# -- retired group lengths ------------------------------------------------------------------------------------------

def image_group_length(part10: bytes) -> tuple[int, int] | None:
    """(declared (0028,0000) value, bytes group 0028 takes in Explicit VR LE) of a Part-10 file, or None."""
    dataset = read(part10)
    if 0x00280000 not in dataset:
        return None
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    for element in dataset.group_dataset(0x0028):
        if element.tag.element != 0:
            write_data_element(buffer, element)
    return int(dataset[0x00280000].value), len(buffer.getvalue())


GROUP_LENGTH_CASES = [
    pytest.param("color-pl.dcm", HTJ2KLossless, id="rgb-planar-htj2k"),  # RGB -> YBR_RCT: 4 bytes longer
    pytest.param("color-px.dcm", HTJ2KLossless, id="rgb-htj2k"),
    pytest.param("color-pl.dcm", ExplicitVRLittleEndian, id="rgb-planar-native"),
    pytest.param("693_J2KR.dcm", HTJ2KLossless, id="j2k-htj2k"),
    pytest.param("693_UNCR.dcm", HTJ2KLossless, id="native-htj2k"),
    pytest.param("693_UNCR.dcm", ExplicitVRLittleEndian, id="native-native"),
]


@pytest.mark.parametrize(("name", "syntax"), GROUP_LENGTH_CASES)
def test_group_length_of_patched_group_is_true_or_gone(name: str, syntax: UID, tmp_path: Path) -> None:
    """Output forms patch Image Pixel elements: a retired (0028,0000) the input carried (PS3.5 7.2) must then
    be dropped or still measure its group, never left stale (color-pl.dcm's 104 would be 4 bytes short)."""
    original = image_group_length(BY_NAME[name].read_bytes())
    assert original is not None and original[0] == original[1]  # the inputs carry a correct one
    with stored_instance(BY_NAME[name], tmp_path) as stored:
        rebuilt = image_group_length(rebuilt_part10(stored, syntax))
    assert rebuilt is None or rebuilt[0] == rebuilt[1]
