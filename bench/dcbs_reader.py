"""DCBS library: per-frame rebuild speed and volume size, against DiCube 0.3.0, on one CT series.

One run measures, on the same realistic 512² 12-bit CT series (``bench/ctseries.py``, 300 slices by
default):

* dcbnode: ``load_from_dicom_folder`` + ``save`` time, volume size, and ms/frame of
  ``DcbStreamingReader.get_dicom_for_frame(i)`` (HTJ2K Lossless Part-10) and
  ``get_dicom_for_frame(i, force_uncompressed=True)`` (native Explicit VR Little Endian);
* DiCube 0.3.0 (PyPI ``dicube``), in a subprocess with its own interpreter (``$DICUBE_PYTHON``, default
  ``/tmp/dicube-venv/bin/python``; dcbnode does not depend on dicube): the same, with its
  ``DcbStreamingReader``.  That virtualenv sees the main site-packages, so the readers are timed *paired*
  in that one process: for every frame, dcbnode's two calls and DiCube's calls run one after the other
  in rotating order, and a busy machine slows all of them alike.  DiCube caches built frames and
  preloads neighbours in a background thread; to time the work of one call it gets ``chunk_size=1,
  cache_size=1``, ``clear_cache()`` before every call and no preloading thread (which would only build
  the same frames ahead of time, in the background of the other calls).  One pass with DiCube's default
  settings is reported too.  DiCube's ``force_uncompressed=True`` still returns HTJ2K (the output syntax
  is recorded), so "DiCube + pydicom decode" adds what a DiCube user must do to get native pixels:
  decode and re-write;
* the transcoding choice for lossless compressed input: for real files of pydicom's test data (JPEG
  lossless, JPEG-LS lossless, JPEG 2000 lossless, RLE), the received pixel bytes against the verified
  HTJ2K that DCBS stores, the time ``encode_instance`` takes (decode + encode + bit-exact check), and the
  per-frame decode time of the original codec against HTJ2K (what a native rebuild costs).

Every timed pass covers every frame; the reported ms/frame is the median of ``--passes`` passes.  Without
DiCube (``--skip-dicube`` or no interpreter) dcbnode is timed alone in this process.
Output: a table on stdout and ``bench/results/dcbs_reader.json``.

Usage: ``python bench/dcbs_reader.py [--count 300] [--passes 3] [--skip-dicube]``
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import imagecodecs  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.encaps import generate_fragmented_frames  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless  # noqa: E402

from bench._benchlib import machine_info, series_info, write_results  # noqa: E402
from bench.ctseries import cached_ct_series  # noqa: E402
from dcbnode import dcbs  # noqa: E402

DICUBE_PYTHON = os.environ.get("DICUBE_PYTHON", "/tmp/dicube-venv/bin/python")
DICUBE_INSTALL = ("python -m venv /tmp/dicube-venv --system-site-packages && "
                  "/tmp/dicube-venv/bin/pip install dicube==0.3.0")
TARGET_HTJ2K = 10.0  # dcbnode HTJ2K path must be at least this many times faster than DiCube's
TARGET_NATIVE = 3.0  # dcbnode native path against DiCube's force_uncompressed path

#: Lossless compressed test files (pydicom and pydicom-data) for the transcoding measurements.
TRANSCODE_FILES = (
    "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    "MR_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm", "emri_small_jpeg_2k_lossless.dcm", "693_J2KR.dcm", "MR2_J2KR.dcm",
    "RG1_J2KR.dcm", "RG3_J2KR.dcm", "US1_J2KR.dcm", "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless
    "MR_small_RLE.dcm", "emri_small_RLE.dcm", "OBXXXX1A_rle.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm",  # RLE
)

#: Runs under DiCube's interpreter.  ``build SRC OUT``: write DiCube's volume; ``paired DICUBE DCBNODE N``:
#: N timed passes over every frame, DiCube's and dcbnode's readers called alternately frame by frame (the
#: DiCube virtualenv sees the main site-packages, dcbnode included).  Prints one JSON object, last line.
DICUBE_SCRIPT = textwrap.dedent("""
    import io, json, os, sys, time, warnings
    warnings.simplefilter("ignore")
    import dicube, pydicom
    from dicube.dicom import DcbStreamingReader

    def build(src, out):
        result = {"dicube": dicube.__version__}
        start = time.perf_counter()
        image = dicube.load_from_dicom_folder(src)
        result["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        dicube.save(image, out)
        result["save_s"] = time.perf_counter() - start
        result["bytes"] = os.path.getsize(out)
        return result

    def native_via_pydicom(blob):
        ds = pydicom.dcmread(io.BytesIO(blob))
        ds.decompress()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def syntax(blob):
        return str(pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True).file_meta.TransferSyntaxUID)

    def paired(dicube_path, dcbnode_path, passes):
        # Frame by frame, the five calls in rotating order, so that load from other jobs hits all alike.
        # DiCube: a fresh build per call (its one-frame cache emptied first) and no preloading thread
        # (it would only build neighbours ahead of time, in the background of the other calls).
        import numpy, dcbnode
        from dcbnode import dcbs
        readers = {"htj2k": DcbStreamingReader(dicube_path, chunk_size=1, cache_size=1),
                   "native": DcbStreamingReader(dicube_path, chunk_size=1, cache_size=1, force_uncompressed=True)}
        for reader in readers.values():
            reader._trigger_preload = lambda index: None

        def dicube_call(name, post=bytes):
            reader = readers[name]
            def call(index):
                reader.clear_cache()
                return post(reader.get_dicom_for_frame(index))
            return call

        ours = dcbs.DcbStreamingReader(dcbnode_path)
        calls = {
            "dcbnode_htj2k": lambda index: ours.get_dicom_for_frame(index),
            "dcbnode_native": lambda index: ours.get_dicom_for_frame(index, force_uncompressed=True),
            "dicube_htj2k": dicube_call("htj2k"),
            "dicube_native": dicube_call("native"),
            "dicube_native_via_pydicom": dicube_call("htj2k", native_via_pydicom),
        }
        count = ours.get_frame_count()
        assert count == readers["htj2k"].get_frame_count()
        result = {"dcbnode_module": dcbnode.__file__, "numpy": numpy.__version__, "pydicom": pydicom.__version__,
                  "frames": count}
        for name, call in calls.items():
            result[name + "_syntax"] = syntax(call(0))
        names = list(calls)
        runs = {name: [] for name in names}
        for _ in range(passes):
            totals = dict.fromkeys(names, 0.0)
            for index in range(count):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    start = time.perf_counter()
                    calls[name](index)
                    totals[name] += time.perf_counter() - start
            for name in names:
                runs[name].append(totals[name] / count * 1000)
        result["runs_ms"] = runs
        ours.close()
        for reader in readers.values():
            reader.close()
        reader = DcbStreamingReader(dicube_path)  # DiCube's defaults: chunk 10, cache 50, preloading
        start = time.perf_counter()
        for index in range(count):
            reader.get_dicom_for_frame(index)
        result["dicube_default_sequential_ms"] = (time.perf_counter() - start) / count * 1000
        reader.close()
        return result

    if sys.argv[1] == "build":
        print(json.dumps(build(sys.argv[2], sys.argv[3])))
    else:
        print(json.dumps(paired(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
""")


def _syntax_of(blob: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def build_dcbnode(paths: list[Path], volume_path: Path) -> dict[str, Any]:
    """Store the series with the library API (timed) and check what will be timed (untimed)."""
    start = time.perf_counter()
    image = dcbs.load_from_dicom_folder(paths[0].parent)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    dcbs.save(image, volume_path)
    save_s = time.perf_counter() - start
    with dcbs.DcbStreamingReader(volume_path) as reader:
        count = reader.get_frame_count()
        assert count == len(paths), (count, len(paths))
        syntaxes = {}
        for name, force in (("htj2k", False), ("native", True)):
            syntaxes[name] = _syntax_of(reader.get_dicom_for_frame(0, force_uncompressed=force))
            for index in (0, count // 2, count - 1):  # the right pixels: first, middle and last slice
                rebuilt = pydicom.dcmread(io.BytesIO(reader.get_dicom_for_frame(index, force_uncompressed=force)))
                assert np.array_equal(rebuilt.pixel_array, pydicom.dcmread(image.files[index]).pixel_array)
        breakdown = htj2k_breakdown(reader)
    assert syntaxes == {"htj2k": HTJ2KLossless, "native": ExplicitVRLittleEndian}, syntaxes
    return {"load_s": load_s, "save_s": save_s, "bytes": volume_path.stat().st_size, "frames": count,
            "htj2k_syntax": syntaxes["htj2k"], "native_syntax": syntaxes["native"], "htj2k_breakdown": breakdown}


def htj2k_breakdown(reader: dcbs.DcbStreamingReader) -> dict[str, float]:
    """Where an HTJ2K ``get_dicom_for_frame`` call spends its time (ms, best of 3 passes over every frame):
    reading and CRC-checking the codestream, writing the file meta group, the whole call."""
    rebuild_module = importlib.import_module("dcbnode.dcbs.rebuild")
    count = reader.get_frame_count()
    stored = [reader.get_instance(index) for index in range(count)]
    return {
        "frame_read_and_crc": best_per_call(lambda i: stored[i].frame(0), count, 3) * 1000,
        "file_meta": best_per_call(lambda i: rebuild_module._file_meta(stored[i].meta, stored[i].blobs,
                                                                         HTJ2KLossless), count, 3) * 1000,
        "whole_call": best_per_call(reader.get_dicom_for_frame, count, 3) * 1000,
    }


def dcbnode_pass(reader: dcbs.DcbStreamingReader) -> dict[str, float]:
    """One timed pass over every frame in each output form: ms per ``get_dicom_for_frame`` call."""
    result = {}
    count = reader.get_frame_count()
    for name, force in (("htj2k", False), ("native", True)):
        for index in range(3):  # warm-up
            reader.get_dicom_for_frame(index, force_uncompressed=force)
        start = time.perf_counter()
        for index in range(count):
            reader.get_dicom_for_frame(index, force_uncompressed=force)
        result[name] = (time.perf_counter() - start) / count * 1000
    return result


def dicube_python() -> str | None:
    """The interpreter that has dicube 0.3.0 (this one if it imports dicube), or None with a message."""
    try:
        import dicube  # noqa: F401  (never in dcbnode's environment, but use it if it is)

        return sys.executable
    except ImportError:
        pass
    if Path(DICUBE_PYTHON).exists():
        return DICUBE_PYTHON
    print(f"DiCube skipped: no interpreter at {DICUBE_PYTHON}; {DICUBE_INSTALL}", file=sys.stderr)
    return None


def run_dicube(python: str, *args: str) -> dict[str, Any]:
    """Run one step of ``DICUBE_SCRIPT`` with DiCube's interpreter."""
    completed = subprocess.run([python, "-c", DICUBE_SCRIPT, *args], capture_output=True, text=True,
                               timeout=3600, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"DiCube step {args[0]} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_readers(paths: list[Path], workdir: Path, passes: int, with_dicube: bool) -> dict[str, Any]:
    """Build both volumes, then time both readers: paired in DiCube's interpreter when it is available,
    else dcbnode alone in this process.  The reported ms/frame is the median pass."""
    ours = build_dcbnode(paths, workdir / "dcbnode.dcbs")
    python = dicube_python() if with_dicube else None
    if python is None:
        with dcbs.DcbStreamingReader(workdir / "dcbnode.dcbs") as reader:
            our_passes = [dcbnode_pass(reader) for _ in range(passes)]
        for name in ("htj2k", "native"):
            runs = [run[name] for run in our_passes]
            ours[name] = {"ms_per_frame": statistics.median(runs), "runs_ms": runs, "timed_in": sys.executable}
        return {"dcbnode": ours, "dicube": None}
    theirs = run_dicube(python, "build", str(paths[0].parent), str(workdir / "dicube.dcbs"))
    theirs["python"] = python
    paired = run_dicube(python, "paired", str(workdir / "dicube.dcbs"), str(workdir / "dcbnode.dcbs"), str(passes))
    assert Path(paired["dcbnode_module"]).resolve() == Path(dcbs.__file__).resolve().parent.parent / "__init__.py"
    for side, name in (("dcbnode", "htj2k"), ("dcbnode", "native"), ("dicube", "htj2k"), ("dicube", "native"),
                       ("dicube", "native_via_pydicom")):
        runs = paired["runs_ms"][f"{side}_{name}"]
        target = ours if side == "dcbnode" else theirs
        target[name] = {"ms_per_frame": statistics.median(runs), "runs_ms": runs,
                        "syntax": paired[f"{side}_{name}_syntax"], "timed_in": python}
    theirs["default_sequential"] = {"ms_per_frame": paired["dicube_default_sequential_ms"]}
    assert ours["htj2k"]["syntax"] == ours["htj2k_syntax"] and ours["native"]["syntax"] == ours["native_syntax"]
    return {"dcbnode": ours, "dicube": theirs}


def _original_fragments(dataset: pydicom.Dataset) -> list[bytes]:
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    return [b"".join(f) for f in generate_fragmented_frames(dataset.PixelData, number_of_frames=frames)]


def best_per_call(call: Callable[[int], object], count: int, repeats: int) -> float:
    """Seconds per call of ``call(i)`` for every ``i``: best of ``repeats`` passes after one warm-up pass."""
    passes = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for index in range(count):
            call(index)
        passes.append((time.perf_counter() - start) / count)
    return min(passes[1:])


def measure_transcoding(repeats: int = 3) -> list[dict[str, Any]]:
    """Received compressed size vs stored HTJ2K size, encode time, per-frame decode times."""
    from pydicom.data import get_testdata_file

    rows = []
    for name in TRANSCODE_FILES:
        path = get_testdata_file(name, download=False)
        if path is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows.append(measure_file(name, Path(path), repeats))
    return rows


def measure_file(name: str, path: Path, repeats: int) -> dict[str, Any]:
    """One row of the transcoding table."""
    dataset = pydicom.dcmread(path)
    encode_runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = dcbs.encode_instance(path)
        encode_runs.append(time.perf_counter() - start)
    image = encoded.meta.image
    assert image is not None
    fragments = _original_fragments(dataset)
    syntax = dataset.file_meta.TransferSyntaxUID
    decoder = get_decoder(syntax)
    original_decode = best_per_call(lambda i: decoder.as_array(dataset, index=i, raw=True), len(fragments),
                                    repeats)
    htj2k_decode = best_per_call(lambda i: imagecodecs.htj2k_decode(encoded.frames[i]), len(encoded.frames),
                                 repeats)
    native = image.rows * image.columns * image.samples_per_pixel * image.bits_allocated // 8 * len(fragments)
    return {
        "file": name,
        "syntax": syntax.name,
        "frames": len(fragments),
        "shape": f"{image.rows}x{image.columns}x{image.samples_per_pixel} {image.bits_stored}/"
                 f"{image.bits_allocated}-bit",
        "stored_as": sorted({entry.codec for entry in encoded.meta.frames}),
        "native_bytes": native,
        "received_bytes": sum(len(f) for f in fragments),
        "stored_bytes": encoded.stored_length,
        "encode_ms": min(encode_runs) * 1000,
        "original_decode_ms_per_frame": original_decode * 1000,
        "htj2k_decode_ms_per_frame": htj2k_decode * 1000,
    }


def print_report(payload: dict[str, Any]) -> None:
    """The tables behind docs/performance.md."""
    ours, theirs = payload["dcbnode"], payload.get("dicube")
    series = payload["series"]
    print(f"\nDCBS reader: {series['count']} slices {series['rows']}x{series['columns']} CT, "
          f"{series['bytes'] / 1e6:.1f} MB of DICOM; load average {payload['load_average_at_start'][0]:.1f} "
          f"at start, {payload['load_average_after_readers'][0]:.1f} after the readers")
    print(f"{'path':<34} {'dcbnode ms/frame':>17} {'DiCube ms/frame':>16} {'ratio':>7} {'target':>7}")
    for key, label, target in (("htj2k", "get_dicom_for_frame (HTJ2K)", TARGET_HTJ2K),
                               ("native", "force_uncompressed=True", TARGET_NATIVE)):
        mine = ours[key]["ms_per_frame"]
        other = theirs[key]["ms_per_frame"] if theirs else float("nan")
        ratio = other / mine
        verdict = "n/a" if not theirs else "ok" if ratio >= target else "MISSED"
        print(f"{label:<34} {mine:>17.2f} {other:>16.2f} {ratio:>6.1f}x {target:>5.0f}x {verdict}")
    if theirs:
        via_pydicom = theirs["native_via_pydicom"]["ms_per_frame"]
        print(f"{'DiCube + pydicom decode to native':<34} {ours['native']['ms_per_frame']:>17.2f} "
              f"{via_pydicom:>16.2f} {via_pydicom / ours['native']['ms_per_frame']:>6.1f}x")
        print(f"{'DiCube default reader, sequential':<34} {'':>17} "
              f"{theirs['default_sequential']['ms_per_frame']:>16.2f}")
        print(f"output syntaxes: dcbnode {ours['htj2k_syntax']} / {ours['native_syntax']}; DiCube "
              f"{theirs['htj2k']['syntax']} / {theirs['native']['syntax']} (force_uncompressed=True)")
    parts = ours["htj2k_breakdown"]
    print(f"dcbnode HTJ2K call, alone in this process: {parts['whole_call']:.2f} ms, of which file meta "
          f"{parts['file_meta']:.2f} ms, frame read + CRC {parts['frame_read_and_crc']:.2f} ms")
    print(f"\n{'volume':<24} {'MB':>8} {'vs DICOM':>9} {'write s':>8}")
    print(f"{'original DICOM files':<24} {series['bytes'] / 1e6:>8.1f} {1:>8.2f}x")
    for label, result in (("dcbnode DCBS", ours), ("DiCube 0.3.0", theirs)):
        if result:
            seconds = result["load_s"] + result["save_s"]
            print(f"{label:<24} {result['bytes'] / 1e6:>8.1f} {series['bytes'] / result['bytes']:>8.2f}x "
                  f"{seconds:>8.1f}")
    print("\nLossless compressed input: received vs stored (verified HTJ2K)")
    print(f"{'file':<34} {'syntax':<28} {'native KB':>9} {'recv KB':>8} {'HTJ2K KB':>8} {'size':>6} "
          f"{'encode ms':>9} {'dec orig':>8} {'dec HT':>7}")
    for row in payload["transcoding"]:
        print(f"{row['file']:<34} {row['syntax'][:28]:<28} {row['native_bytes'] / 1024:>9.1f} "
              f"{row['received_bytes'] / 1024:>8.1f} {row['stored_bytes'] / 1024:>8.1f} "
              f"{row['stored_bytes'] / row['received_bytes']:>6.2f} {row['encode_ms']:>9.1f} "
              f"{row['original_decode_ms_per_frame']:>8.2f} {row['htj2k_decode_ms_per_frame']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="slices in the CT series")
    parser.add_argument("--passes", type=int, default=3, help="timed passes over every frame")
    parser.add_argument("--skip-dicube", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/dcbs_reader.json)")
    args = parser.parse_args(argv)
    paths = cached_ct_series(args.count)
    with tempfile.TemporaryDirectory(prefix="dcbs-reader-") as tmp:
        workdir = Path(tmp)
        payload: dict[str, Any] = {
            "benchmark": "dcbs_reader",
            "description": "ms per get_dicom_for_frame call (HTJ2K and native), volume sizes; dcbnode vs DiCube "
                           "0.3.0; lossless compressed input: received vs stored HTJ2K",
            "series": series_info(paths),
            "passes": args.passes,
            "machine": machine_info(),
            "load_average_at_start": os.getloadavg(),
            **measure_readers(paths, workdir, args.passes, not args.skip_dicube),
            "load_average_after_readers": os.getloadavg(),
        }
    payload["transcoding"] = measure_transcoding()
    ours, theirs = payload["dcbnode"], payload["dicube"]
    if theirs:
        payload["ratios"] = {
            "htj2k_speedup": theirs["htj2k"]["ms_per_frame"] / ours["htj2k"]["ms_per_frame"],
            "native_speedup": theirs["native"]["ms_per_frame"] / ours["native"]["ms_per_frame"],
            "native_speedup_vs_dicube_plus_pydicom_decode":
                theirs["native_via_pydicom"]["ms_per_frame"] / ours["native"]["ms_per_frame"],
            "size_dcbnode_vs_dicube": ours["bytes"] / theirs["bytes"],
            "targets": {"htj2k": TARGET_HTJ2K, "native": TARGET_NATIVE},
        }
    print_report(payload)
    print(f"\nwrote {write_results('dcbs_reader', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
