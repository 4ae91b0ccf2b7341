"""Ingest end to end: DCMTK storescu and pynetdicom send to a ``dcbnode serve`` subprocess, and every
instance comes back from the DCBS volumes identical to what was sent."""

from __future__ import annotations

import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from conftest import indexed_count, read_back, rebuilt_part10, scu_store, stop_node
from faithful import as_reencoded, element_differences, pixels_equal, read
from peers import run_storescu
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

TEST_FILES = Path(get_testdata_file("CT_small.dcm", download=False)).parent
#: Uncompressed files with distinct SOP Instance UIDs (several pydicom files share one).
PLAIN_FILES = ["CT_small.dcm", "examples_overlay.dcm", "liver_1frame.dcm", "SC_rgb_small_odd.dcm",
               "test-SR.dcm", "waveform_ecg.dcm", "rtplan.dcm", "MR_small_implicit.dcm"]
#: Compressed files for storescu -xf, one presentation context per (SOP class, syntax).
DCMTK_COMPRESSED = ["SC_rgb_jpeg_dcmtk.dcm", "693_J2KI.dcm", "GDCMJ2K_TextGBR.dcm", "SC_rgb_rle.dcm"]
#: Compressed files sent with pynetdicom (JPEG baseline, J2K, RLE, JPEG-LS); HTJ2K is made below.
PYNETDICOM_COMPRESSED = ["SC_jpeg_no_color_transform.dcm", "J2K_pixelrep_mismatch.dcm",
                         "rtdose_rle_1frame.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def assert_faithful(data_dir: Path, database_url: str, originals: list[Path | pydicom.Dataset],
                    calling_aet: str, *, sent_padding: bool = True) -> None:
    """Every original is indexed and rebuilds element- and pixel-identical.

    File meta is not sent over the network: the stored one names the sender instead
    (SourceApplicationEntityTitle, PS3.10 7.1), which is checked, then ignored in the comparison.
    """
    archive = read_back(data_dir, database_url)
    try:
        for original in originals:
            # storescu and pynetdicom (sending a Dataset) re-encode what they send: compared by value
            # (tests/test_fidelity_sweep.py sends files as their own bytes and proves those).
            source = as_reencoded(original if isinstance(original, pydicom.Dataset) else read(original))
            rebuilt = read(rebuilt_part10(archive, str(source.SOPInstanceUID)))
            assert rebuilt.file_meta.SourceApplicationEntityTitle == calling_aet
            source.file_meta.SourceApplicationEntityTitle = calling_aet
            if not sent_padding:  # DCMTK does not transmit Data Set Trailing Padding (PS3.10 7.2)
                source.pop(0xFFFCFFFC, None)
            assert element_differences(source, rebuilt) == [], original
            assert pixels_equal(source, rebuilt), original
        assert indexed_count(archive) == len({str(_uid(o)) for o in originals})
    finally:
        archive.close()


def _uid(original: Path | pydicom.Dataset) -> str:
    ds = original if isinstance(original, pydicom.Dataset) else pydicom.dcmread(original, stop_before_pixels=True)
    return str(ds.SOPInstanceUID)


def _storescu_profile(path: Path, files: list[Path]) -> Path:
    """A storescu -xf configuration proposing exactly one context per (SOP class, syntax) of ``files``."""
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                    for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)})
    syntaxes = sorted({syntax for _, syntax in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for number, syntax in enumerate(syntaxes):
        lines += [f"[TS{number}]", f"TransferSyntax1 = {syntax}"]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    for number, (sop_class, syntax) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{number} = {sop_class}\\TS{syntaxes.index(syntax)}")
    lines += ["", "[[Profiles]]", "[Compressed]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines))
    return path


def test_dcmtk_storescu_folders_files_and_compressed(database_url, running_node, tmp_path):
    folder = tmp_path / "dicomdirtests"
    not_instances = shutil.ignore_patterns("DICOMDIR*", "README*", "*.txt")
    shutil.copytree(TEST_FILES / "dicomdirtests", folder, ignore=not_instances)
    series_files = sorted(p for p in folder.rglob("*") if p.is_file())
    plain = [TEST_FILES / name for name in PLAIN_FILES]
    compressed = [TEST_FILES / name for name in DCMTK_COMPRESSED]
    node = running_node(database_url=database_url)

    for args in ((folder, ()), (plain, ("-R",))):
        result = run_storescu(args[0], node.host, node.port, node.aet, extra_args=args[1])
        assert result.returncode == 0, result.stderr + node.log()[-2000:]
    cfg = _storescu_profile(tmp_path / "storescu.cfg", compressed)
    result = run_storescu(compressed, node.host, node.port, node.aet,
                          extra_args=("-xf", str(cfg), "Compressed"))
    assert result.returncode == 0, result.stderr + node.log()[-2000:]

    assert stop_node(node) == 0
    assert_faithful(node.data_dir, database_url, series_files + plain + compressed, "STORESCU",
                    sent_padding=False)
    log = node.log()
    assert "C-STORE from STORESCU" in log and "status 0x0000" in log
    assert "association released from STORESCU@127.0.0.1" in log


def _htj2k_file(tmp_path: Path) -> pydicom.Dataset:
    """CT_small as HTJ2K Lossless (no such file exists offline; imagecodecs makes one)."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    pixels = ds.pixel_array
    frame = imagecodecs.htj2k_encode(np.ascontiguousarray(pixels), level=0)  # level 0 = reversible
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "htj2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    reread = pydicom.dcmread(path)
    assert np.array_equal(reread.pixel_array, pixels)
    return reread


def test_pynetdicom_scu_compressed(database_url, running_node, tmp_path):
    files = [TEST_FILES / name for name in PYNETDICOM_COMPRESSED]
    htj2k = _htj2k_file(tmp_path)
    node = running_node(database_url=database_url)
    statuses = scu_store(node, [*files, htj2k])
    assert [s.Status for s in statuses] == [0] * (len(files) + 1), node.log()[-3000:]
    assert stop_node(node) == 0
    assert_faithful(node.data_dir, database_url, [*files, htj2k], "PYSCU")


@pytest.mark.parametrize("name", ["CT_small.dcm"])
def test_echo_and_restart_keeps_archive(running_node, tmp_path, name):
    node = running_node(name="first")
    assert scu_store(node, [TEST_FILES / name])[0].Status == 0
    assert stop_node(node) == 0
    again = running_node(name="second", data_dir=node.data_dir)
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(again.host, again.port, ae_title=again.aet)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert "recovery: 1 volume(s)" in again.log()
