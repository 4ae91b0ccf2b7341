"""C-STORE throughput: DCMTK ``storescu`` sends the CT series over ONE association to each target.

Targets: DCMTK ``storescp``, DCMTK ``dcmqrscp`` and a bare pynetdicom C-STORE SCP (``tests/peers.py``).
Every run gets a freshly started target; the reported rate is instances / wall time of the ``storescu``
process (its start-up and input-file check included, target start-up excluded), median of ``--repeats``.

Run: ``python bench/peer_store_rates.py [--count 300] [--repeats 3] [--targets storescp,pynetdicom]``.
Writes ``bench/results/peer_store_rates.json``.

Reuse (e.g. to add dcbnode)::

    from bench.peer_store_rates import TARGETS, measure_store_rate, run_benchmark
    targets = {**TARGETS, "dcbnode": my_factory}  # my_factory() -> context manager yielding (host, port, aet)
    run_benchmark(targets, files)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._benchlib import (
    Target,
    TargetFactory,
    load_average,
    machine_busy_seconds,
    machine_info,
    print_table,
    series_info,
    summarize,
    write_results,
)
from bench.ctseries import cached_ct_series
from tests.peers import dcmqrscp, pynetdicom_store_scp, run_storescu, storescp

__all__ = [
    "STORESCU_ARGS",
    "TARGETS",
    "main",
    "measure_store_rate",
    "run_benchmark",
    "send_concurrently",
    "store_once",
]

# -R: propose only the presentation contexts the files need (one CT context, uncompressed syntaxes).
STORESCU_ARGS: tuple[str, ...] = ("-R",)


class CountMismatchError(RuntimeError):
    """A target stored a different number of instances than were sent."""


def _check_count(name: str, got: int, expected: int) -> None:
    if got != expected:
        raise CountMismatchError(f"{name}: received {got} of {expected} instances")


def storescp_target(expected: int | None = None) -> TargetFactory:
    """Factory for DCMTK storescp (``+xa``) writing into a temp dir; checks the file count on exit."""

    @contextlib.contextmanager
    def factory() -> Iterator[Target]:
        with tempfile.TemporaryDirectory(prefix="bench-storescp-") as tmp, storescp(Path(tmp)) as scp:
            yield scp.host, scp.port, scp.aet
            if expected is not None:
                _check_count("storescp", len(scp.received()), expected)

    return factory


def dcmqrscp_target(expected: int | None = None) -> TargetFactory:
    """Factory for an empty DCMTK dcmqrscp (fork mode); checks the stored file count on exit."""

    @contextlib.contextmanager
    def factory() -> Iterator[Target]:
        with dcmqrscp([]) as qr:
            yield qr.host, qr.port, qr.aet
            if expected is not None:
                stored = [p for p in qr.storage_dir.iterdir() if p.name != "index.dat"]
                _check_count("dcmqrscp", len(stored), expected)

    return factory


def pynetdicom_target(expected: int | None = None, max_pdu: int | None = None) -> TargetFactory:
    """Factory for the bare pynetdicom C-STORE SCP (in this process); checks the received count on exit."""

    @contextlib.contextmanager
    def factory() -> Iterator[Target]:
        with tempfile.TemporaryDirectory(prefix="bench-pystore-") as tmp, \
                pynetdicom_store_scp(Path(tmp), max_pdu=max_pdu) as scp:
            yield scp.host, scp.port, scp.aet
            if expected is not None:
                _check_count("pynetdicom", len(scp.received), expected)

    return factory


def send_concurrently(target: Target, files: Sequence[Path], associations: int = 1,
                      storescu_args: Sequence[str] = STORESCU_ARGS) -> None:
    """Send ``files`` to ``target`` over ``associations`` simultaneous ``storescu`` processes (disjoint
    slices of the list, interleaved); raises ``RuntimeError`` if any of them fails."""
    host, port, aet = target
    parts = [list(files[i::associations]) for i in range(associations)]
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(lambda i: run_storescu(parts[i], host, port, aet, calling_aet=f"STORESCU{i}",
                                                       extra_args=storescu_args), range(associations)))
    failed = [f"storescu {i} exit {r.returncode}: {r.stdout}{r.stderr}"[-1000:]
              for i, r in enumerate(results) if r.returncode != 0]
    if failed:
        raise RuntimeError("; ".join(failed))


def store_once(
    target_factory: TargetFactory, files: Sequence[Path], storescu_args: Sequence[str] = STORESCU_ARGS,
    associations: int = 1, cpu_ms_out: list[float] | None = None,
) -> float:
    """Start a target, send ``files`` over ``associations`` simultaneous storescu (one each), stop it; return
    the seconds until the last storescu ended (and append the machine's busy CPU ms per instance meanwhile,
    senders included, to ``cpu_ms_out``).

    Raises ``RuntimeError`` if a storescu fails (it halts with a non-zero exit at the first failed C-STORE)
    or the target's own check on exit fails.
    """
    with target_factory() as target:
        start, busy = time.perf_counter(), machine_busy_seconds()
        send_concurrently(target, files, associations, storescu_args)
        elapsed = time.perf_counter() - start
        if cpu_ms_out is not None:
            cpu_ms_out.append((machine_busy_seconds() - busy) * 1000 / len(files))
    return elapsed


def measure_store_rate(
    target_factory: TargetFactory,
    files: Sequence[Path],
    *,
    repeats: int = 1,
    storescu_args: Sequence[str] = STORESCU_ARGS,
    seconds_out: list[float] | None = None,
) -> float:
    """Instances/s for ``storescu`` → target over ONE association; median of ``repeats`` fresh targets.

    ``target_factory()`` must return a context manager that starts the target and yields
    ``(host, port, aet)``. Each run's seconds are appended to ``seconds_out`` if given.
    """
    rates = []
    for _ in range(max(1, repeats)):
        elapsed = store_once(target_factory, files, storescu_args)
        if seconds_out is not None:
            seconds_out.append(elapsed)
        rates.append(len(files) / elapsed)
    return statistics.median(rates)


TARGETS: dict[str, Any] = {
    "dcmtk-storescp": storescp_target,
    "dcmtk-dcmqrscp": dcmqrscp_target,
    "pynetdicom-scp": pynetdicom_target,
}
"""Name → ``f(expected_count) -> TargetFactory`` for the reference peers."""


def run_benchmark(
    targets: Mapping[str, TargetFactory], files: Sequence[Path], *, repeats: int = 3,
    associations: Mapping[str, int] | None = None, loads_out: list[float] | None = None,
) -> list[dict[str, Any]]:
    """Measure every target ``repeats`` times, round-robin: each round runs every target once, so that a
    machine whose speed drifts (VMs do, by 2× within minutes) weighs on all targets alike, and the runs of
    one round can be compared pairwise.  ``associations`` gives the number of simultaneous storescu per
    target name (default 1); the load average before each round is appended to ``loads_out``.
    Returns result rows (see ``bench._benchlib.summarize``)."""
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    cpu_ms: dict[str, list[float]] = {name: [] for name in targets}
    for round_number in range(1, repeats + 1):
        if loads_out is not None:
            loads_out.append(load_average())
        for name, factory in targets.items():
            seconds[name].append(store_once(factory, files, associations=(associations or {}).get(name, 1),
                                            cpu_ms_out=cpu_ms[name]))
        print(f"  round {round_number} (load {load_average()}): " + ", ".join(f"{name} {len(files) / runs[-1]:.1f}/s"
                                                   for name, runs in seconds.items()), flush=True)
    return [summarize(name, [len(files) / s for s in runs], runs, cpu_ms[name]) for name, runs in seconds.items()]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="slices in the series (default 300)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {list(TARGETS)}")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/...)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    files = cached_ct_series(args.count)
    info = series_info(files)
    print(f"series: {info['count']} × {info['rows']}×{info['columns']} CT, {info['bytes'] / 1e6:.1f} MB")
    factories = {n: TARGETS[n](len(files)) for n in names}
    rows = run_benchmark(factories, files, repeats=args.repeats)
    print_table("storescu → target, one association (instances/s)", rows, info["bytes"] / len(files) / 1e6)
    payload = {
        "benchmark": "peer_store_rates",
        "description": "DCMTK storescu (TCP_NODELAY=1, " + " ".join(STORESCU_ARGS)
        + ") sends the series over one association; rate = instances / storescu wall time",
        "series": info,
        "repeats": args.repeats,
        "machine": machine_info(),
        "results": rows,
    }
    print(f"\nwrote {write_results('peer_store_rates', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
