"""C-GET throughput: DCMTK ``getscu`` retrieves the CT series (SERIES level, Study Root) from each source.

Source: DCMTK ``dcmqrscp`` pre-loaded (``dcmqridx``) with the series. The source is started and loaded once
(not timed); then one untimed warm-up C-GET and ``--repeats`` timed ones, each into an empty directory. The
rate is instances / wall time of the ``getscu`` process (which writes every instance to disk, as a viewer
would); every run must deliver exactly the series' instance count.

Run: ``python bench/peer_get_rates.py [--count 300] [--repeats 3]``.
Writes ``bench/results/peer_get_rates.json``.

Reuse (e.g. to add dcbnode)::

    from bench.peer_get_rates import SOURCES, measure_get_rate, run_benchmark
    sources = {**SOURCES, "dcbnode": my_factory}  # my_factory(files) -> cm yielding (host, port, aet)
    run_benchmark(sources, files)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._benchlib import (
    SourceFactory,
    Target,
    machine_busy_seconds,
    machine_info,
    print_table,
    series_info,
    summarize,
    write_results,
)
from bench.ctseries import cached_ct_series
from tests.peers import dcmqrscp, run_getscu

__all__ = ["GETSCU_ARGS", "SOURCES", "get_once", "main", "measure_get_rate", "run_benchmark"]

# -S: Study Root Q/R information model. getscu's default storage contexts cover CT with uncompressed TS.
GETSCU_ARGS: tuple[str, ...] = ("-S",)


@contextlib.contextmanager
def dcmqrscp_source(files: Sequence[Path]) -> Iterator[Target]:
    """DCMTK dcmqrscp (fork mode) holding ``files``."""
    with dcmqrscp(files) as qr:
        yield qr.host, qr.port, qr.aet


SOURCES: dict[str, SourceFactory] = {"dcmtk-dcmqrscp": dcmqrscp_source}


def series_keys(files: Sequence[Path]) -> dict[str, str]:
    """SERIES-level C-GET identifier for a one-series file list."""
    info = series_info(files[:1])
    return {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": info["study_uid"],
        "SeriesInstanceUID": info["series_uid"],
    }


def get_once(
    target: Target, keys: Mapping[str, str], expected: int, getscu_args: Sequence[str] = GETSCU_ARGS,
    cpu_ms_out: list[float] | None = None,
) -> float:
    """One C-GET into a fresh temp dir; return getscu's wall seconds (and append the machine's busy CPU ms
    per instance meanwhile, getscu included, to ``cpu_ms_out``). Raises unless exactly ``expected``
    instances arrived and getscu exited 0."""
    host, port, aet = target
    tmp = Path(tempfile.mkdtemp(prefix="bench-getscu-"))
    try:
        start, busy = time.perf_counter(), machine_busy_seconds()
        result = run_getscu(host, port, aet, tmp, keys, extra_args=getscu_args)
        elapsed = time.perf_counter() - start
        if cpu_ms_out is not None:
            cpu_ms_out.append((machine_busy_seconds() - busy) * 1000 / expected)
        got = sum(1 for p in tmp.iterdir() if p.is_file())
        if result.returncode != 0 or got != expected:
            raise RuntimeError(
                f"getscu exit {result.returncode}, {got} of {expected} instances: "
                f"{result.stdout}{result.stderr}"[-2000:]
            )
        return elapsed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_get_rate(
    source_factory: SourceFactory,
    files: Sequence[Path],
    *,
    repeats: int = 1,
    warmup: bool = True,
    getscu_args: Sequence[str] = GETSCU_ARGS,
    seconds_out: list[float] | None = None,
    cpu_ms_out: list[float] | None = None,
) -> float:
    """Instances/s for a SERIES-level ``getscu`` C-GET of ``files`` (one series) from the source.

    ``source_factory(files)`` must return a context manager that starts a Q/R SCP holding ``files`` and
    yields ``(host, port, aet)``; it is entered once for the warm-up and all ``repeats``. Returns the median;
    each run's seconds are appended to ``seconds_out`` if given (its machine CPU, see :func:`get_once`, to
    ``cpu_ms_out``).
    """
    keys = series_keys(files)
    rates = []
    with source_factory(files) as target:
        if warmup:
            get_once(target, keys, len(files), getscu_args)
        for _ in range(max(1, repeats)):
            elapsed = get_once(target, keys, len(files), getscu_args, cpu_ms_out)
            if seconds_out is not None:
                seconds_out.append(elapsed)
            rates.append(len(files) / elapsed)
    return statistics.median(rates)


def run_benchmark(
    sources: Mapping[str, SourceFactory], files: Sequence[Path], *, repeats: int = 3
) -> list[dict[str, Any]]:
    """Measure every source; return result rows (see ``bench._benchlib.summarize``)."""
    rows = []
    for name, factory in sources.items():
        seconds: list[float] = []
        measure_get_rate(factory, files, repeats=repeats, seconds_out=seconds)
        rows.append(summarize(name, [len(files) / s for s in seconds], seconds))
        print(f"  {name}: {rows[-1]['median_per_s']:.1f} instances/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="slices in the series (default 300)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/...)")
    args = parser.parse_args(argv)
    files = cached_ct_series(args.count)
    info = series_info(files)
    print(f"series: {info['count']} × {info['rows']}×{info['columns']} CT, {info['bytes'] / 1e6:.1f} MB")
    rows = run_benchmark(SOURCES, files, repeats=args.repeats)
    print_table("getscu ← source, SERIES-level C-GET (instances/s)", rows, info["bytes"] / len(files) / 1e6)
    payload = {
        "benchmark": "peer_get_rates",
        "description": "DCMTK getscu (TCP_NODELAY=1, " + " ".join(GETSCU_ARGS)
        + ") C-GETs the series at SERIES level into an empty dir; rate = instances / getscu wall time",
        "series": info,
        "repeats": args.repeats,
        "machine": machine_info(),
        "results": rows,
    }
    print(f"\nwrote {write_results('peer_get_rates', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
