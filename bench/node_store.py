"""C-STORE ingest rate of ``dcbnode serve`` next to storescp, dcmqrscp and a bare pynetdicom SCP.

DCMTK ``storescu`` sends the CT series (``bench/ctseries.py``) over one association to each target
(``bench/peer_store_rates.py`` measures); dcbnode runs as a subprocess with a fresh data directory.

Run: ``python bench/node_store.py [--count 300] [--repeats 3]``; writes ``bench/results/node_store.json``.

``--concurrent 8 [--senders storescu|pynetdicom] [--workers 1,2]`` instead sends the series to dcbnode
alone over 8 simultaneous associations (disjoint eighths of the series), once per ``[node] workers``
value given (side by side, round after round), and reports the aggregate rate and the memory of every
process of the node (main, workers, compressor, rebuild helpers): VmRSS once listening, sampled VmRSS
during the ingest, and each process's peak VmHWM from ``/proc/<pid>/status`` read just before the stop;
every instance must end up in the index. Writes ``bench/results/node_store_concurrent.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import child_pids, indexed_count, read_back, start_node, stop_node

from bench._benchlib import Target, TargetFactory, machine_info, print_table, series_info, write_results
from bench.ctseries import cached_ct_series
from bench.peer_store_rates import STORESCU_ARGS, TARGETS, run_benchmark
from tests.peers import run_storescu


def dcbnode_target(expected: int | None = None, *, compressed_after: list[float] | None = None,
                   **node_config: object) -> TargetFactory:
    """Factory for a dcbnode subprocess on a fresh data directory; checks exit 0 on stop.

    With ``compressed_after``, each run appends how many seconds after the sender finished the node had
    compressed everything (deferred compression: the index's ``pending_compression`` table is empty).
    """

    @contextlib.contextmanager
    def factory() -> Iterator[Target]:
        with tempfile.TemporaryDirectory(prefix="bench-dcbnode-") as tmp:
            node = start_node(Path(tmp), log_level="WARNING", **node_config)
            try:
                yield node.host, node.port, node.aet
                if compressed_after is not None:
                    compressed_after.append(_seconds_until_compressed(node.data_dir / "index.sqlite"))
            finally:
                code = stop_node(node)
                if code != 0:
                    raise RuntimeError(f"dcbnode exited {code}: {node.log()[-2000:]}")

    return factory


def _seconds_until_compressed(index: Path, timeout: float = 600.0) -> float:
    """Seconds until the node's index marks no volume for deferred compression any more."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)) as connection:
            if not connection.execute("SELECT count(*) FROM pending_compression").fetchone()[0]:
                return time.perf_counter() - started
        time.sleep(0.05)
    raise RuntimeError(f"volumes still wait for compression after {timeout:.0f} s")


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM…) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def node_processes(pid: int) -> list[int]:
    """The node's main process and every process under it."""
    tree = [pid]
    for parent in tree:
        tree += child_pids(parent)
    return tree


def tree_kib(pid: int, field: str) -> dict[int, int]:
    """``field`` of every process of the node, by pid (processes that ended meanwhile left out)."""
    values = {}
    for member in node_processes(pid):
        with contextlib.suppress(OSError, KeyError):
            values[member] = proc_status_kib(member, field)
    return values


def _send_storescu(files: Sequence[Path], host: str, port: int, aet: str, index: int) -> str | None:
    result = run_storescu(files, host, port, aet, calling_aet=f"STORESCU{index}", extra_args=STORESCU_ARGS)
    return None if result.returncode == 0 else f"storescu {index} exit {result.returncode}: {result.stderr[-500:]}"


def _send_pynetdicom(files: Sequence[Path], host: str, port: int, aet: str, index: int) -> str | None:
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=f"PYSCU{index}")
    for sop_class, syntax in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        return f"pynetdicom {index}: association not established"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status.get("Status") != 0:
                return f"pynetdicom {index}: status {status.get('Status')} for {ds.SOPInstanceUID}"
    finally:
        if assoc.is_established:
            assoc.release()
    return None


def measure_concurrent(files: Sequence[Path], associations: int = 8, senders: str = "storescu",
                       **node_config: object) -> dict[str, Any]:
    """Send ``files`` to a fresh dcbnode over ``associations`` simultaneous associations; rate and RSS."""
    send = {"storescu": _send_storescu, "pynetdicom": _send_pynetdicom}[senders]
    parts = [list(files[i::associations]) for i in range(associations)]
    with tempfile.TemporaryDirectory(prefix="bench-dcbnode-") as tmp:
        node = start_node(Path(tmp), log_level="WARNING", max_associations=max(10, associations), **node_config)
        pid = node.process.pid
        try:
            time.sleep(2.0)  # let the start-up settle (the wait-for-port probe, the workers' imports)
            rss_idle = sum(tree_kib(pid, "VmRSS").values())
            samples: list[int] = []
            errors: list[str] = []
            threads = [threading.Thread(target=lambda i=i: errors.append(send(parts[i], node.host, node.port,
                                                                              node.aet, i) or ""))
                       for i in range(associations)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                samples.append(sum(tree_kib(pid, "VmRSS").values()))
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
            peaks = sorted(tree_kib(pid, "VmHWM").values(), reverse=True)
            rss_after = sum(tree_kib(pid, "VmRSS").values())
        finally:
            code = stop_node(node)
        failures = [e for e in errors if e]
        if code != 0 or failures:
            raise RuntimeError(f"dcbnode exit {code}; {failures}; {node.log()[-2000:]}")
        archive = read_back(node.data_dir)
        try:
            stored = indexed_count(archive)
        finally:
            archive.close()
        if stored != len(files):
            raise RuntimeError(f"{stored} instance(s) indexed, {len(files)} sent")
    mib = 1024.0
    return {
        "associations": associations, "senders": senders, "workers": node_config.get("workers"),
        "instances": len(files), "seconds": elapsed, "instances_per_s": len(files) / elapsed,
        "processes": len(peaks), "rss_idle_mib": rss_idle / mib,
        "rss_median_during_mib": statistics.median(samples or [0]) / mib, "rss_after_mib": rss_after / mib,
        "vmhwm_per_process_mib": [round(p / mib, 1) for p in peaks],
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=0, metavar="N",
                        help="dcbnode only: N simultaneous associations, report rate and peak RSS")
    parser.add_argument("--senders", choices=("storescu", "pynetdicom"), default="storescu")
    parser.add_argument("--workers", default="", help="with --concurrent: comma list of [node] workers values")
    args = parser.parse_args(argv)
    files = cached_ct_series(args.count)
    info = series_info(files)
    if args.concurrent:
        configs = [{"workers": int(w)} for w in args.workers.split(",") if w] or [{}]
        runs = [measure_concurrent(files, args.concurrent, args.senders, **config)
                for _ in range(args.repeats) for config in configs]
        for run in runs:
            print(f"{run['associations']} × {run['senders']}, workers {run['workers'] or 'default'}: "
                  f"{run['instances_per_s']:.1f} instances/s; {run['processes']} processes, RSS total idle "
                  f"{run['rss_idle_mib']:.0f} MiB, median during {run['rss_median_during_mib']:.0f} MiB, after "
                  f"{run['rss_after_mib']:.0f} MiB; peak VmHWM per process "
                  f"{', '.join(f'{p:.0f}' for p in run['vmhwm_per_process_mib'])} MiB", flush=True)
        payload = {"benchmark": "node_store_concurrent", "series": info, "machine": machine_info(), "results": runs}
        print(f"\nwrote {write_results('node_store_concurrent', payload)}")
        return 0
    compressed_after: list[float] = []
    factories = {
        # compression_delay 1 s instead of 10: the same ingest, a shorter wait until everything is compressed
        "dcbnode": dcbnode_target(len(files), compressed_after=compressed_after, compression_delay=1.0),
        "dcbnode-inline": dcbnode_target(len(files), compression="inline"),
        **{n: f(len(files)) for n, f in TARGETS.items()},
    }
    rows = run_benchmark(factories, files, repeats=args.repeats)
    print_table("storescu → target, one association (instances/s)", rows, info["bytes"] / len(files) / 1e6)
    by_name = {row["target"]: row for row in rows}
    ratios = [node / bare for node, bare in zip(by_name["dcbnode"]["runs_per_s"],
                                                  by_name["pynetdicom-scp"]["runs_per_s"], strict=True)]
    seconds = by_name["dcbnode"]["runs_s"]
    end_to_end = [len(files) / (sent + later) for sent, later in zip(seconds, compressed_after, strict=True)]
    print(f"\ndcbnode / bare pynetdicom SCP, per round: {' '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f})")
    print(f"dcbnode: all compressed {statistics.median(compressed_after):.1f} s after the last instance "
          f"(compression_delay 1 s); acknowledged-and-compressed rate {statistics.median(end_to_end):.1f}/s")
    payload = {"benchmark": "node_store", "series": info, "repeats": args.repeats, "machine": machine_info(),
               "results": rows, "dcbnode_over_pynetdicom_per_round": [round(r, 3) for r in ratios],
               "dcbnode_compressed_after_s": [round(s, 2) for s in compressed_after],
               "dcbnode_end_to_end_per_s": [round(r, 1) for r in end_to_end]}
    print(f"\nwrote {write_results('node_store', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
