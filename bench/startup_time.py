"""How long ``dcbnode serve`` takes to start (until it accepts associations) on a large archive.

Builds the archive once through the archive API, not over the network: tiny 4×4 instances, ``--series``
volumes of ``--per-series`` instances (4 series per study).  The build skips ``fsync`` (it only makes
test data; what is measured afterwards is the node's start-up, which reads the files back).  Then starts
the node ``--runs`` times and reports, per run, the seconds from the process start to the port accepting
connections and the recovery time the node logged, for:

* a clean archive (every volume's ``indexed_end`` at its end, as after a clean stop);
* ``--unclean`` volumes each with one record that reached the disk but not the index (what a crash
  during as many C-STOREs leaves): recovery indexes them.

    python bench/startup_time.py /var/tmp/startup-archive --series 1000 --per-series 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._benchlib import REPO, machine_info


def _tiny_instance(study: str, series: str, number: int) -> bytes:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = "P" + study[-8:], "STARTUP^TEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.Modality, ds.InstanceNumber = "20250101", "OT", number
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build(data_dir: Path, series: int, per_series: int) -> None:
    """Store ``series × per_series`` tiny instances with :meth:`Archive.store` (fsync skipped)."""
    from pydicom.uid import generate_uid

    os.fsync = lambda fd: None  # test data only: the build would otherwise wait on the disk 2× per instance

    from dcbnode.archive import Archive

    archive = Archive(data_dir, f"sqlite:///{data_dir / 'index.sqlite'}")
    started = time.monotonic()
    study = ""
    for number in range(series):
        if number % 4 == 0:
            study = generate_uid()
        series_uid = generate_uid()
        for instance in range(per_series):
            archive.store(_tiny_instance(study, series_uid, instance + 1))
        if number % 50 == 49:
            done = (number + 1) * per_series
            print(f"built {done} instances, {done / (time.monotonic() - started):.0f}/s", file=sys.stderr)
    archive.close()


def make_unclean(data_dir: Path, volumes: int) -> None:
    """What a crash leaves behind: in ``volumes`` volumes, one more record fsynced but never indexed (an
    instance whose C-STORE was in flight).  Recovery finds and indexes them."""
    import sqlite3

    from dcbnode.archive.archive import volume_path_for
    from dcbnode.dcbs import Volume, append_instance, parse_instance

    with sqlite3.connect(data_dir / "index.sqlite") as connection:
        rows = connection.execute("SELECT series.series_instance_uid, studies.study_instance_uid FROM series "
                                  "JOIN studies ON studies.id = series.study_pk LIMIT ?", (volumes,)).fetchall()
    for series_uid, study_uid in rows:
        encoded = parse_instance(_tiny_instance(study_uid, series_uid, 0)).encode()
        with Volume.open(data_dir / volume_path_for(series_uid), writable=True) as volume:
            append_instance(volume, encoded)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_once(data_dir: Path) -> dict[str, float]:
    """Start the node, wait until its port accepts a connection, stop it; the timings."""
    port = _free_port()
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "dcbnode.cli.node", "serve", "--data-dir", str(data_dir),
                                "--port", str(port), "--bind", "127.0.0.1"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"node exited with {process.returncode}: {process.stdout.read()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        ready = time.monotonic() - started
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    recovery = re.search(r"recovery: (\d+) volume\(s\).* in ([\d.]+) s", output)
    return {"ready_seconds": round(ready, 2),
            "recovery_seconds": float(recovery.group(2)) if recovery else float("nan"),
            "volumes": int(recovery.group(1)) if recovery else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--unclean", type=int, default=100, help="volumes left unclean for the second case")
    args = parser.parse_args()
    if not (args.data_dir / "index.sqlite").exists():
        build(args.data_dir, args.series, args.per_series)
    results = {"machine": machine_info(), "instances": args.series * args.per_series}
    results["clean"] = [start_once(args.data_dir) for _ in range(args.runs)]
    unclean = []
    for _ in range(args.runs):
        make_unclean(args.data_dir, args.unclean)
        unclean.append(start_once(args.data_dir))
    results[f"unclean_{args.unclean}"] = unclean
    for case in ("clean", f"unclean_{args.unclean}"):
        ready = [run["ready_seconds"] for run in results[case]]
        print(f"{case}: ready in {statistics.median(ready):.2f} s (median of {len(ready)}: {ready}); recovery "
              f"{[run['recovery_seconds'] for run in results[case]]} s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
