"""Issue 12's ratios side by side in one run: dcbnode against Orthanc, dcmqrscp and a bare pynetdicom SCP.

1. Store (round-robin, ``--repeats`` rounds, a fresh peer every run): 4 simultaneous DCMTK ``storescu``
   (disjoint quarters of the 512² CT series of ``bench/ctseries.py``) into dcbnode (SQLite, and PostgreSQL
   with ``--postgres URL``: a fresh database per run) and into Orthanc; one ``storescu`` association into
   dcbnode, the bare pynetdicom SCP (unlimited PDU) and Orthanc.  Rate = instances / seconds until the
   last storescu ended.  Targets: dcbnode ×4 ≥ 1.0× Orthanc ×4 and ≥ 1.7× dcbnode ×1; dcbnode ×1 ≥ 1.0×
   the pynetdicom SCP.
2. C-GET native to DCMTK ``getscu`` (SERIES level) from dcmqrscp, from dcbnode (holding the series in
   compressed volumes, ``bench/retrieve_rate.py``) and from Orthanc (loaded by 4 storescu first); per round
   each source is started, loaded (untimed), warmed up once and timed once.  Target: dcbnode ≥ 1.0× both.

Each run also records the machine's busy CPU milliseconds per instance (every process: the peer under
test *and* its storescu/getscu), the "cpu ms" column: on a machine whose cores are saturated that, not the
peer's design, bounds the rate.  The load average is recorded before every round (the 2-core VM is shared).
Orthanc is located by ``bench/orthanc.py``; without it the Orthanc rows are left out and the run says so.

``--series N`` makes the store section send N series of ``count / N`` slices instead (storescu ``i`` of
N sends series ``i`` alone): more associations then append to different volumes.

Run: ``python bench/capacity.py [--count 300] [--repeats 3] [--postgres URL] [--series 1] [--skip-get]``.
Writes ``bench/results/capacity.json``.  Bounded: every peer and tool has a timeout and is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import _postgres_database

from bench._benchlib import (
    Target,
    TargetFactory,
    load_average,
    machine_info,
    print_table,
    series_info,
    summarize,
    write_results,
)
from bench.ctseries import cached_ct_series
from bench.node_store import dcbnode_target
from bench.orthanc import MISSING, orthanc_binary, orthanc_source, orthanc_target
from bench.peer_get_rates import dcmqrscp_source, measure_get_rate
from bench.peer_store_rates import pynetdicom_target, run_benchmark
from bench.retrieve_rate import dcbnode_source, loaded_data_dir

# (numerator, denominator, target ratio): what issue 12 asks, by row name
STORE_TARGETS = [("dcbnode ×4", "orthanc ×4", 1.0), ("dcbnode ×4", "dcbnode ×1", 1.7),
                 ("dcbnode ×1", "pynetdicom-scp ×1", 1.0), ("dcbnode-pg ×4", "orthanc ×4", 1.0)]
GET_TARGETS = [("dcbnode", "dcmtk-dcmqrscp", 1.0), ("dcbnode", "orthanc", 1.0)]


def postgres_dcbnode(base_url: str) -> TargetFactory:
    """dcbnode on a fresh PostgreSQL database (created from ``base_url``'s server, dropped after)."""

    @contextlib.contextmanager
    def factory() -> Iterator[Target]:
        with contextlib.contextmanager(_postgres_database)(base_url) as url, dcbnode_target(database_url=url)() as t:
            yield t

    return factory


def ratios(rows: Sequence[dict[str, Any]], wanted: Sequence[tuple[str, str, float]]) -> list[dict[str, Any]]:
    """Per-round and median ratios of the rows named in ``wanted`` (rows absent are skipped)."""
    by_name = {row["target"]: row for row in rows}
    out = []
    for top, bottom, target in wanted:
        if top in by_name and bottom in by_name:
            per_round = [a / b for a, b in zip(by_name[top]["runs_per_s"], by_name[bottom]["runs_per_s"],
                                               strict=True)]
            median = statistics.median(per_round)
            out.append({"ratio": f"{top} / {bottom}", "per_round": [round(r, 2) for r in per_round],
                        "median": round(median, 2), "target": target, "met": median >= target})
    for entry in out:
        print(f"  {entry['ratio']}: median {entry['median']:.2f} (rounds "
              f"{' '.join(f'{r:.2f}' for r in entry['per_round'])}), target ≥ {entry['target']} "
              f"{'met' if entry['met'] else 'MISSED'}", flush=True)
    return out


def store_section(files: Sequence[Path], repeats: int, postgres: str | None,
                  have_orthanc: bool, loads: list[float]) -> list[dict[str, Any]]:
    """Round-robin store runs; returns result rows."""
    targets: dict[str, TargetFactory] = {"dcbnode ×4": dcbnode_target()}
    if postgres:
        targets["dcbnode-pg ×4"] = postgres_dcbnode(postgres)
    if have_orthanc:
        targets["orthanc ×4"] = orthanc_target()
    targets |= {"dcbnode ×1": dcbnode_target(), "pynetdicom-scp ×1": pynetdicom_target(len(files))}
    if have_orthanc:
        targets["orthanc ×1"] = orthanc_target()
    associations = {name: int(name.rsplit("×", 1)[1]) for name in targets}
    return run_benchmark(targets, files, repeats=repeats, associations=associations, loads_out=loads)


def get_section(files: Sequence[Path], repeats: int, have_orthanc: bool,
                loads: list[float]) -> list[dict[str, Any]]:
    """Round-robin C-GET runs (native, getscu); returns result rows."""
    data_dir = loaded_data_dir(files, "archive-" + files[0].parent.name)
    sources: Mapping[str, Callable[[Sequence[Path]], Any]] = {
        "dcmtk-dcmqrscp": dcmqrscp_source, "dcbnode": dcbnode_source(data_dir),
        **({"orthanc": orthanc_source()} if have_orthanc else {}),
    }
    seconds: dict[str, list[float]] = {name: [] for name in sources}
    cpu_ms: dict[str, list[float]] = {name: [] for name in sources}
    for round_number in range(1, repeats + 1):
        loads.append(load_average())
        for name, factory in sources.items():
            measure_get_rate(factory, files, repeats=1, seconds_out=seconds[name], cpu_ms_out=cpu_ms[name])
        print(f"  round {round_number} (load {loads[-1]}): " + ", ".join(
            f"{name} {len(files) / runs[-1]:.1f}/s" for name, runs in seconds.items()), flush=True)
    return [summarize(name, [len(files) / s for s in runs], runs, cpu_ms[name]) for name, runs in seconds.items()]


def store_files(count: int, series: int) -> list[Path]:
    """``count`` slices as ``series`` series, interleaved so that the i-th of ``series`` simultaneous
    senders (``files[i::series]``, see ``send_concurrently``) gets series i alone."""
    if series == 1:
        return cached_ct_series(count)
    parts = [cached_ct_series(count // series, seed=seed) for seed in range(series)]
    return [part[k] for k in range(count // series) for part in parts]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", default=os.environ.get("DCBNODE_TEST_POSTGRES_URL", ""),
                        help="server URL for dcbnode-pg rows (default $DCBNODE_TEST_POSTGRES_URL; '' skips)")
    parser.add_argument("--series", type=int, choices=(1, 2, 4), default=1,
                        help="store section: that many series of count/N slices (default 1)")
    parser.add_argument("--skip-get", action="store_true")
    parser.add_argument("--skip-store", action="store_true")
    args = parser.parse_args(argv)
    have_orthanc = orthanc_binary() is not None
    if not have_orthanc:
        print(f"WARNING: {MISSING}; the Orthanc rows are left out", flush=True)
    files = cached_ct_series(args.count)
    info = series_info(files)
    mb = info["bytes"] / len(files) / 1e6
    payload: dict[str, Any] = {"benchmark": "capacity", "series": info, "repeats": args.repeats,
                               "machine": machine_info(), "orthanc": orthanc_binary()}
    if not args.skip_store:
        loads: list[float] = []
        payload["store_series"] = args.series
        rows = store_section(store_files(args.count, args.series), args.repeats, args.postgres or None,
                             have_orthanc, loads)
        print_table("storescu → target, ×N simultaneous associations (instances/s)", rows, mb)
        payload["store"] = {"load_before_rounds": loads, "results": rows, "ratios": ratios(rows, STORE_TARGETS)}
    if not args.skip_get:
        loads = []
        rows = get_section(files, args.repeats, have_orthanc, loads)
        print_table("getscu ← source, SERIES-level C-GET, native (instances/s)", rows, mb)
        payload["get"] = {"load_before_rounds": loads, "results": rows, "ratios": ratios(rows, GET_TARGETS)}
    print(f"\nwrote {write_results('capacity', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
