"""The DiCube-style library API: ``load_from_dicom_folder`` → ``save`` → ``DcbStreamingReader``.

Series come from pydicom's ``dicomdirtests`` (real CT series folders) and from CT slices written here
with shuffled file names, so the frame order can only come from the headers.  Bad folders must fail with
an exception that names the offending file (or folder).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from faithful import element_differences, pixels_equal, read
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, generate_uid

from dcbnode import dcbs

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
MR_SMALL = Path(str(get_testdata_file("MR_small.dcm")))
DICOMDIR_TESTS = Path(pydicom.data.data_manager.DATA_ROOT, "test_files", "dicomdirtests")
CT_FOLDERS = ("77654033/CT2", "98892001/CT2N", "98892001/CT5N")


def decode_with_openjpeg(blob: bytes) -> np.ndarray:
    """Decode Part-10 bytes with pydicom's pylibjpeg plugin (pylibjpeg-openjpeg for HTJ2K), nothing else."""
    dataset = read(blob)
    dataset.pixel_array_options(decoding_plugin="pylibjpeg")
    return dataset.pixel_array


def open_fds_on(path: Path) -> int:
    """How many of this process's file descriptors point at ``path``."""
    fd_dir = Path("/proc/self/fd")
    count = 0
    for entry in fd_dir.iterdir():
        try:
            count += os.readlink(entry) == str(path)
        except OSError:  # the descriptor that listed the directory is closed already
            continue
    return count


@pytest.mark.parametrize("folder", CT_FOLDERS)
def test_dicomdirtests_ct_series(folder: str, tmp_path: Path) -> None:
    """A real CT series folder: every slice back, in InstanceNumber order, HTJ2K and native, faithful."""
    source = DICOMDIR_TESTS / folder
    files = sorted(p for p in source.iterdir() if p.is_file())
    image = dcbs.load_from_dicom_folder(source)
    assert len(image) == len(files)
    assert image.series_instance_uid == read(files[0]).SeriesInstanceUID
    volume_path = dcbs.save(image, tmp_path / "series.dcbs")
    assert volume_path == tmp_path / "series.dcbs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series.dcbs"]  # no temporary left behind
    originals = sorted((read(p) for p in files), key=lambda ds: int(ds.InstanceNumber))
    with dcbs.DcbStreamingReader(volume_path) as reader:
        assert reader.get_frame_count() == len(files)
        for index, original in enumerate(originals):
            blob = reader.get_dicom_for_frame(index)
            rebuilt = read(blob)
            assert rebuilt.file_meta.TransferSyntaxUID == HTJ2KLossless
            assert rebuilt.SOPInstanceUID == original.SOPInstanceUID
            assert element_differences(original, rebuilt) == []
            assert np.array_equal(decode_with_openjpeg(blob), original.pixel_array)
            native = read(reader.get_dicom_for_frame(index, force_uncompressed=True))
            assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert element_differences(original, native) == []
            assert pixels_equal(original, native)


def test_reader_is_a_context_manager_that_closes(tmp_path: Path) -> None:
    """The file is open inside ``with`` and closed after it."""
    volume_path = dcbs.save(dcbs.load_from_dicom_folder(DICOMDIR_TESTS / CT_FOLDERS[0]), tmp_path / "v.dcbs")
    before = open_fds_on(volume_path)
    with dcbs.DcbStreamingReader(volume_path) as reader:
        assert open_fds_on(volume_path) == before + 1
        assert reader.get_frame_count() == 4
    assert open_fds_on(volume_path) == before


def test_save_replaces_an_existing_volume(tmp_path: Path) -> None:
    """``save`` to an existing path replaces the file as a whole (never appends to it)."""
    target = tmp_path / "v.dcbs"
    dcbs.save(dcbs.load_from_dicom_folder(DICOMDIR_TESTS / CT_FOLDERS[1]), target)
    dcbs.save(dcbs.load_from_dicom_folder(DICOMDIR_TESTS / CT_FOLDERS[2]), target)
    with dcbs.DcbStreamingReader(target) as reader:
        assert reader.get_frame_count() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.dcbs"]


# -- frame order ------------------------------------------------------------------------------------------------

SLICES = 7


def write_ct_slices(folder: Path, *, instance_numbers: list[int | None], z: list[float], seed: int = 0) -> list[str]:
    """Write CT slices (CT_small with distinct pixels) under random file names; return SOP UIDs by slice."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(CT_SMALL)
    series_uid = generate_uid()
    names = [f"{random.Random(seed * 100 + i).getrandbits(40):010x}.dcm" for i in range(len(z))]
    random.Random(seed).shuffle(names)
    uids = []
    for index, (number, position) in enumerate(zip(instance_numbers, z, strict=True)):
        ds = pydicom.dcmread(CT_SMALL)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if number is None:
            del ds.InstanceNumber
        else:
            ds.InstanceNumber = number
        ds.ImagePositionPatient = [*template.ImagePositionPatient[:2], position]
        ds.PixelData = (template.pixel_array + index * 7).astype(template.pixel_array.dtype).tobytes()
        ds.save_as(folder / names[index], enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


ORDERS = {
    # InstanceNumber decides even when positions run the other way.
    "instance-number": ([3, 1, 7, 5, 2, 6, 4], [-30.0, -10.0, -70.0, -50.0, -20.0, -60.0, -40.0]),
    # No InstanceNumber: slice position (z) ascending.
    "position-only": ([None] * SLICES, [12.5, -3.0, 40.0, 7.25, 0.0, -20.5, 33.0]),
    # Equal InstanceNumbers: position breaks the tie.
    "position-breaks-ties": ([2, 1, 2, 1, 2, 1, 2], [5.0, 9.0, -5.0, 3.0, 0.0, -1.0, 1.0]),
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_frame_order_follows_instance_number_then_position(order: str, tmp_path: Path) -> None:
    """Frames come back by InstanceNumber, then ImagePositionPatient z; file names play no part."""
    numbers, z = ORDERS[order]
    uids = write_ct_slices(tmp_path / "in", instance_numbers=numbers, z=z, seed=len(order))
    expected = [uid for _, _, uid in sorted(zip([(n is None, n or 0) for n in numbers], z, uids, strict=True))]
    assert expected != [uids[i] for i in np.argsort([p.name for p in (tmp_path / "in").iterdir()])]
    image = dcbs.load_from_dicom_folder(tmp_path / "in")
    assert [read(path).SOPInstanceUID for path in image.files] == expected
    volume_path = dcbs.save(image, tmp_path / "ordered.dcbs")
    reference = pydicom.dcmread(CT_SMALL).pixel_array
    with dcbs.DcbStreamingReader(volume_path) as reader:
        assert reader.get_frame_count() == SLICES
        served = [read(reader.get_dicom_for_frame(i, force_uncompressed=True)) for i in range(SLICES)]
    assert [ds.SOPInstanceUID for ds in served] == expected
    for ds in served:
        index = uids.index(ds.SOPInstanceUID)
        assert np.array_equal(ds.pixel_array, (reference + index * 7).astype(reference.dtype))


# -- bad input --------------------------------------------------------------------------------------------------


def _series_folder(folder: Path, count: int = 3) -> Path:
    """A valid small CT series to which each test adds one bad file."""
    write_ct_slices(folder, instance_numbers=list(range(1, count + 1)), z=[float(i) for i in range(count)])
    return folder


def load_and_save(folder: Path, target: Path) -> None:
    """The whole pipeline: a bad file may be caught while listing the folder or while storing it."""
    dcbs.save(dcbs.load_from_dicom_folder(folder), target)


def _assert_names(error: BaseException, path: Path) -> None:
    assert str(path) in str(error), str(error)


@pytest.mark.parametrize(("name", "content"), [
    pytest.param("notes.txt", b"slice thickness 1 mm\n", id="text-file"),
    pytest.param("empty.dcm", b"", id="empty-file"),
    pytest.param("random.dcm", np.random.default_rng(3).bytes(4096), id="random-bytes"),
])
def test_non_dicom_file_in_folder(tmp_path: Path, name: str, content: bytes) -> None:
    """A non-DICOM file among the slices: InvalidDatasetError naming it, and no volume written."""
    folder = _series_folder(tmp_path / "series")
    bad = folder / name
    bad.write_bytes(content)
    with pytest.raises(dcbs.InvalidDatasetError) as caught:
        load_and_save(folder, tmp_path / "out.dcbs")
    _assert_names(caught.value, bad)
    assert caught.value.source == str(bad)
    assert not (tmp_path / "out.dcbs").exists()


@pytest.mark.parametrize("cut", [
    pytest.param("inside-pixel-data", id="inside-pixel-data"),
    pytest.param("inside-header", id="inside-header"),  # 6 of the 8 header bytes of (0010,0040) remain
    pytest.param("one-byte-short", id="one-byte-short"),  # inside the trailing (FFFC,FFFC) padding
])
def test_truncated_dicom_file_in_folder(tmp_path: Path, cut: str) -> None:
    """A slice cut short: InvalidDatasetError naming the file and saying it is short."""
    folder = _series_folder(tmp_path / "series")
    bad = sorted(folder.iterdir())[1]  # one slice of the series, cut in place
    data = bad.read_bytes()
    # 6 of the 8 header bytes of (0010,0040) Patient's Sex: where it lies depends on the UIDs' lengths (a cut
    # at a fixed offset sometimes fell between two elements, where the file looks complete).
    inside_header = data.index(b"\x10\x00\x40\x00CS") + 6
    length = {"inside-pixel-data": len(data) - 2000, "inside-header": inside_header,
              "one-byte-short": len(data) - 1}[cut]
    bad.write_bytes(data[:length])
    with pytest.raises(dcbs.InvalidDatasetError) as caught:
        load_and_save(folder, tmp_path / "out.dcbs")
    _assert_names(caught.value, bad)
    assert re.search(r"truncat|Pixel Data has \d+ bytes, its attributes require \d+", caught.value.reason), \
        caught.value.reason
    assert not (tmp_path / "out.dcbs").exists()


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_dicom_file_without_pixel_data_in_folder(tmp_path: Path, name: str) -> None:
    """An RT Plan or SR among the slices is not an image of the series: refused, naming the file."""
    folder = _series_folder(tmp_path / "series")
    bad = folder / name
    shutil.copyfile(str(get_testdata_file(name)), bad)
    with pytest.raises(dcbs.InvalidDatasetError, match="no Pixel Data") as caught:
        dcbs.load_from_dicom_folder(folder)
    _assert_names(caught.value, bad)


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    """Slices of two series: refused, naming the folder and how many series it holds."""
    folder = _series_folder(tmp_path / "series")
    write_ct_slices(folder, instance_numbers=[1, 2], z=[0.0, 1.0], seed=9)
    with pytest.raises(dcbs.InvalidDatasetError, match="2 series") as caught:
        dcbs.load_from_dicom_folder(folder)
    _assert_names(caught.value, folder)


def test_two_series_error_names_a_file_of_each_series(tmp_path: Path) -> None:
    """The message points at the stray slices, not only at the folder."""
    folder = _series_folder(tmp_path / "series")
    stray = MR_SMALL.name
    shutil.copyfile(MR_SMALL, folder / stray)
    with pytest.raises(dcbs.InvalidDatasetError) as caught:
        dcbs.load_from_dicom_folder(folder)
    assert stray in str(caught.value)


def test_two_files_of_one_instance(tmp_path: Path) -> None:
    """A slice copied twice under two names: refused, naming both files, rather than one silently
    hiding the other in the volume."""
    folder = _series_folder(tmp_path / "series")
    original = sorted(folder.iterdir())[0]
    copy = folder / "zz-copy.dcm"
    shutil.copyfile(original, copy)
    with pytest.raises(dcbs.InvalidDatasetError, match="same SOP Instance UID") as caught:
        dcbs.load_from_dicom_folder(folder)
    assert original.name in str(caught.value)
    assert copy.name in str(caught.value)


def test_empty_folder(tmp_path: Path) -> None:
    """No files at all: an error naming the folder (not an empty volume)."""
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(dcbs.DcbsError, match="no DICOM files") as caught:
        dcbs.load_from_dicom_folder(folder)
    _assert_names(caught.value, folder)


def test_not_a_folder(tmp_path: Path) -> None:
    """A file or a missing path instead of a folder is refused by name."""
    for path in (CT_SMALL, tmp_path / "missing"):
        with pytest.raises(dcbs.DcbsError, match="not a directory") as caught:
            dcbs.load_from_dicom_folder(path)
        _assert_names(caught.value, path)


@pytest.mark.parametrize("content", [b"", b"not a volume at all" * 10, CT_SMALL.read_bytes()],
                         ids=["empty", "text", "dicom"])
def test_reader_refuses_non_volumes(tmp_path: Path, content: bytes) -> None:
    """``DcbStreamingReader`` on a file that is neither DCBS nor DiCube raises DcbsFormatError by name."""
    path = tmp_path / "x.dcbs"
    path.write_bytes(content)
    with pytest.raises(dcbs.DcbsFormatError) as caught:
        dcbs.DcbStreamingReader(path)
    _assert_names(caught.value, path)


def test_multi_frame_instance_is_one_frame_of_the_api(tmp_path: Path) -> None:
    """A multi-frame instance is one API frame and comes back whole (10 frames of emri_small)."""
    folder = tmp_path / "mf"
    folder.mkdir()
    source = Path(str(get_testdata_file("emri_small.dcm", download=False)))
    shutil.copyfile(source, folder / "emri.dcm")
    volume_path = dcbs.save(dcbs.load_from_dicom_folder(folder), tmp_path / "mf.dcbs")
    with dcbs.DcbStreamingReader(volume_path) as reader:
        assert reader.get_frame_count() == 1
        blob = reader.get_dicom_for_frame(0)
    original = read(source)
    assert read(blob).NumberOfFrames == original.NumberOfFrames == 10
    assert np.array_equal(decode_with_openjpeg(blob), original.pixel_array)


def test_htj2k_blob_is_standard_part10(tmp_path: Path) -> None:
    """What ``get_dicom_for_frame`` returns is a complete Part-10 file: preamble, DICM, matching meta."""
    volume_path = dcbs.save(dcbs.load_from_dicom_folder(DICOMDIR_TESTS / CT_FOLDERS[2]), tmp_path / "v.dcbs")
    with dcbs.DcbStreamingReader(volume_path) as reader:
        blob = reader.get_dicom_for_frame(0)
    assert blob[:128] == b"\0" * 128 and blob[128:132] == b"DICM"
    dataset = pydicom.dcmread(io.BytesIO(blob))  # no force: a conforming file
    assert dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert dataset.file_meta.MediaStorageSOPClassUID == dataset.SOPClassUID


def test_frame_index_out_of_range(tmp_path: Path) -> None:
    """Past the end raises IndexError, as DiCube's reader does."""
    volume_path = dcbs.save(dcbs.load_from_dicom_folder(DICOMDIR_TESTS / CT_FOLDERS[1]), tmp_path / "v.dcbs")
    with dcbs.DcbStreamingReader(volume_path) as reader, pytest.raises(IndexError):
        reader.get_dicom_for_frame(reader.get_frame_count())


def test_negative_frame_index_is_refused(tmp_path: Path) -> None:
    """A negative index is an error, not a count from the end (DiCube semantics)."""
    volume_path = dcbs.save(dcbs.load_from_dicom_folder(DICOMDIR_TESTS / CT_FOLDERS[1]), tmp_path / "v.dcbs")
    with dcbs.DcbStreamingReader(volume_path) as reader, pytest.raises(IndexError):
        reader.get_dicom_for_frame(-1)
