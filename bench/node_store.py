"""C-STORE ingest rate of ``dcbnode serve`` next to storescp, dcmqrscp and a bare pynetdicom SCP.

DCMTK ``storescu`` sends the CT series (``bench/ctseries.py``) over one association to each target
(``bench/peer_store_rates.py`` measures); dcbnode runs as a subprocess with a fresh data directory.

Run: ``python bench/node_store.py [--count 300] [--repeats 3]``; writes ``bench/results/node_store.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_node, stop_node

from bench._benchlib import Target, TargetFactory, machine_info, print_table, series_info, write_results
from bench.ctseries import cached_ct_series
from bench.peer_store_rates import TARGETS, run_benchmark


def dcbnode_target(expected: int | None = None, **node_config: object) -> TargetFactory:
    """Factory for a dcbnode subprocess on a fresh data directory; checks exit 0 on stop."""

    @contextlib.contextmanager
    def factory() -> Iterator[Target]:
        with tempfile.TemporaryDirectory(prefix="bench-dcbnode-") as tmp:
            node = start_node(Path(tmp), log_level="WARNING", **node_config)
            try:
                yield node.host, node.port, node.aet
            finally:
                code = stop_node(node)
                if code != 0:
                    raise RuntimeError(f"dcbnode exited {code}: {node.log()[-2000:]}")

    return factory


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    files = cached_ct_series(args.count)
    info = series_info(files)
    factories = {"dcbnode": dcbnode_target(len(files)), **{n: f(len(files)) for n, f in TARGETS.items()}}
    rows = run_benchmark(factories, files, repeats=args.repeats)
    print_table("storescu → target, one association (instances/s)", rows, info["bytes"] / len(files) / 1e6)
    payload = {"benchmark": "node_store", "series": info, "repeats": args.repeats, "machine": machine_info(),
               "results": rows}
    print(f"\nwrote {write_results('node_store', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
