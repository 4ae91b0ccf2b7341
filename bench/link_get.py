"""C-GET over a 100 Mbit/s link: HTJ2K from dcbnode to a pynetdicom SCU vs native from dcmqrscp to getscu.

The link is the loopback of a private network namespace limited by ``tc tbf`` (rate ``--rate``, burst
256 kb, latency 200 ms); every peer and client of the run lives in that namespace, so no traffic leaves
it.  The script (root, ``ip`` and ``tc`` needed) creates the namespace, runs itself inside it with
``ip netns exec`` and deletes it afterwards, also on failure or timeout.

Inside, round-robin for ``--repeats`` rounds (no warm-up: the link, not a cache, decides): DCMTK
``getscu`` native from dcmqrscp; ``getscu`` native from dcbnode; a pynetdicom SCU accepting only HTJ2K,
in its own process, from dcbnode (``bench/retrieve_rate.py``: the stored codestreams are sent as they
are).  The dcbnode data directory is the one ``bench/retrieve_rate.py`` caches.  Target: HTJ2K ≥ 2×
dcmqrscp native.

Run: ``python bench/link_get.py [--count 300] [--repeats 3] [--rate 100mbit]``.
Writes ``bench/results/link_get.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._benchlib import (
    REPO,
    Target,
    load_average,
    machine_info,
    print_table,
    series_info,
    summarize,
    write_results,
)
from bench.ctseries import cached_ct_series
from bench.peer_get_rates import dcmqrscp_source, get_once, series_keys
from bench.retrieve_rate import _node, htj2k_get_once, loaded_data_dir

INSIDE_TIMEOUT = 1200.0  # seconds for the whole run inside the namespace
SCU_TIMEOUT = 300.0  # seconds for one HTJ2K C-GET process


@contextlib.contextmanager
def limited_namespace(rate: str) -> Iterator[str]:
    """A network namespace whose loopback is limited to ``rate`` by ``tc tbf``; deleted on exit."""
    name = f"dcbnode-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        for command in (["ip", "link", "set", "lo", "up"],
                        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb",
                         "latency", "200ms"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def htj2k_in_process(target: Target, files: Sequence[Path]) -> float:
    """Seconds of one HTJ2K C-GET made by a pynetdicom SCU in a process of its own."""
    host, port, aet = target
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--htj2k-scu", host, str(port), aet,
                             "--count", str(len(files))], capture_output=True, text=True, timeout=SCU_TIMEOUT,
                            check=False, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"HTJ2K SCU exit {result.returncode}: {result.stdout}{result.stderr}"[-2000:])
    return float(result.stdout.split()[-1])


def inside(count: int, repeats: int, rate: str) -> int:
    """The measurement, run inside the namespace."""
    files = cached_ct_series(count)
    info = series_info(files)
    keys = series_keys(files)
    data_dir = loaded_data_dir(files, "archive-" + files[0].parent.name)
    seconds: dict[str, list[float]] = {"dcmtk-dcmqrscp (getscu, native)": [], "dcbnode (getscu, native)": [],
                                       "dcbnode (pynetdicom SCU, HTJ2K)": []}
    loads = []
    for round_number in range(1, repeats + 1):
        loads.append(load_average())
        with dcmqrscp_source(files) as target:
            seconds["dcmtk-dcmqrscp (getscu, native)"].append(get_once(target, keys, len(files)))
        with _node(data_dir) as node:
            target = (node.host, node.port, node.aet)
            seconds["dcbnode (getscu, native)"].append(get_once(target, keys, len(files)))
            seconds["dcbnode (pynetdicom SCU, HTJ2K)"].append(htj2k_in_process(target, files))
        print(f"  round {round_number} (load {loads[-1]}): " + ", ".join(
            f"{name} {runs[-1]:.1f} s" for name, runs in seconds.items()), flush=True)
    rows = [summarize(name, [len(files) / s for s in runs], runs) for name, runs in seconds.items()]
    print_table(f"C-GET over a {rate} link (instances/s)", rows, info["bytes"] / len(files) / 1e6)
    per_round = [native / htj2k for native, htj2k in zip(*(seconds[k] for k in (
        "dcmtk-dcmqrscp (getscu, native)", "dcbnode (pynetdicom SCU, HTJ2K)")), strict=True)]
    median = statistics.median(per_round)
    print(f"  HTJ2K from dcbnode / native from dcmqrscp: median {median:.2f} (rounds "
          f"{' '.join(f'{r:.2f}' for r in per_round)}), target ≥ 2.0 {'met' if median >= 2.0 else 'MISSED'}")
    payload: dict[str, Any] = {
        "benchmark": "link_get", "rate": rate, "series": info, "repeats": repeats, "machine": machine_info(),
        "load_before_rounds": loads, "results": rows,
        "htj2k_over_dcmqrscp_per_round": [round(r, 2) for r in per_round], "htj2k_over_dcmqrscp": round(median, 2),
    }
    print(f"\nwrote {write_results('link_get', payload)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", default="100mbit", help="tc tbf rate of the link (default 100mbit)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--htj2k-scu", nargs=3, metavar=("HOST", "PORT", "AET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.htj2k_scu:
        host, port, aet = args.htj2k_scu
        files = cached_ct_series(args.count)
        print(htj2k_get_once((host, int(port), aet), series_keys(files), len(files), 0))
        return 0
    if args.inside:
        return inside(args.count, args.repeats, args.rate)
    if os.geteuid() != 0:
        parser.error("needs root (ip netns, tc)")
    files = cached_ct_series(args.count)  # made and loaded here, outside the limited link
    loaded_data_dir(files, "archive-" + files[0].parent.name)
    with limited_namespace(args.rate) as namespace:
        command = ["ip", "netns", "exec", namespace, sys.executable, str(Path(__file__).resolve()), "--inside",
                   "--count", str(args.count), "--repeats", str(args.repeats), "--rate", args.rate]
        return subprocess.run(command, timeout=INSIDE_TIMEOUT, check=False, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
