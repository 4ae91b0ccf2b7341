"""Shared plumbing for the ``bench/`` scripts: target types, result JSON, table printing.

A *target* is a DICOM peer under test, given as a factory: a zero-argument callable returning a context
manager that starts the peer, yields ``(host, port, aet)`` and stops it on exit (``TargetFactory``). A
retrieve *source* is the same but takes the files it must hold first (``SourceFactory``). Benchmarks never
know how a peer is started, so dcbnode can be added next to the DCMTK and pynetdicom peers untouched.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pydicom

__all__ = [
    "REPO",
    "RESULTS_DIR",
    "SourceFactory",
    "Target",
    "TargetFactory",
    "load_average",
    "machine_busy_seconds",
    "machine_info",
    "print_table",
    "series_info",
    "summarize",
    "write_results",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

Target = tuple[str, int, str]  # (host, port, called AE title)
TargetFactory = Callable[[], AbstractContextManager[Target]]
# A retrieve source: given the files it must hold, a context manager that starts a Q/R SCP holding them
# (loading is not timed) and yields (host, port, aet).
SourceFactory = Callable[[Sequence[Path]], AbstractContextManager[Target]]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "pydicom": pydicom.__version__,
        "argv": sys.argv,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": load_average(),
    }


def load_average() -> float:
    """One-minute load average: the 2-core VM is shared with other jobs, so every round records it."""
    return round(os.getloadavg()[0], 2)


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``: all but idle and
    iowait).  The difference over a run is what the peer under test *and* its senders/receivers used
    together: on a machine whose cores are saturated, that per instance is what bounds the rate."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def series_info(files: Sequence[Path]) -> dict[str, Any]:
    """Study/Series UIDs, count and size of a one-series file list."""
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {
        "count": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "study_uid": str(first.StudyInstanceUID),
        "series_uid": str(first.SeriesInstanceUID),
        "rows": int(first.Rows),
        "columns": int(first.Columns),
        "transfer_syntax": str(first.file_meta.TransferSyntaxUID),
    }


def summarize(name: str, rates: Sequence[float], seconds: Sequence[float],
              cpu_ms: Sequence[float] = ()) -> dict[str, Any]:
    """One result row: every run plus median/best; ``cpu_ms``: the machine's busy CPU milliseconds per
    instance of each run (:func:`machine_busy_seconds`), when measured."""
    row = {
        "target": name,
        "median_per_s": round(statistics.median(rates), 1),
        "best_per_s": round(max(rates), 1),
        "runs_per_s": [round(r, 1) for r in rates],
        "runs_s": [round(s, 3) for s in seconds],
    }
    if cpu_ms:
        row["machine_cpu_ms_per_instance"] = round(statistics.median(cpu_ms), 2)
        row["runs_machine_cpu_ms"] = [round(c, 2) for c in cpu_ms]
    return row


def print_table(title: str, rows: Sequence[dict[str, Any]], mb_per_instance: float) -> None:
    """Plain-text table of result rows."""
    print(f"\n{title}")
    print(f"{'target':<28} {'median/s':>9} {'best/s':>9} {'MB/s':>7} {'cpu ms':>7}  runs/s")
    for row in rows:
        runs = " ".join(f"{r:.0f}" for r in row["runs_per_s"])
        mbs = row["median_per_s"] * mb_per_instance
        rates = f"{row['median_per_s']:>9.1f} {row['best_per_s']:>9.1f}"
        cpu = row.get("machine_cpu_ms_per_instance")
        print(f"{row['target']:<28} {rates} {mbs:>7.1f} {'' if cpu is None else f'{cpu:.2f}':>7}  {runs}")


def write_results(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """Write ``payload`` as ``bench/results/<name>.json`` (or ``path``); return the path."""
    out = path or RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
