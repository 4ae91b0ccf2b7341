"""C-GET rate and memory of dcbnode against DCMTK ``dcmqrscp``, in one run.

1. ``getscu`` (DCMTK, TCP_NODELAY=1, its default uncompressed storage contexts, i.e. dcbnode's native
   fallback) C-GETs the 512² CT series (``bench/ctseries.py``, ``--count`` slices) at SERIES level from
   dcmqrscp holding the files and from dcbnode holding the same files (see ``bench/peer_get_rates.py``:
   one untimed warm-up, ``--repeats`` timed runs, rate = instances / getscu wall time, every instance
   written to disk).
2. A pynetdicom SCU that accepts only HTJ2K (Lossless, then lossy-allowed) C-GETs the same series from
   dcbnode (dcbnode splices the stored HTJ2K codestream without decoding) and writes each instance's bytes
   to disk, like getscu.  Same warm-up / repeats.
3. Peak RSS of the node while ``getscu`` C-GETs a ``--instances``-instance series (copies of pydicom's
   CT_small with new UIDs): ``VmHWM`` of the node process, which started just before (loading happens
   offline, through the library), and its RSS before the retrieve.

dcbnode runs as ``dcbnode serve`` in a subprocess (SQLite index, log level WARNING); its data directory is
filled once through :class:`dcbnode.archive.Archive` (not timed) and cached under ``bench/.cache/retrieve/``.

Run: ``python bench/retrieve_rate.py [--count 300] [--repeats 3] [--instances 2000] [--max-pdu N]``.
Writes ``bench/results/retrieve_rate.json``.  Targets: native ≥ dcmqrscp; HTJ2K ≥ 1.5× dcmqrscp.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench``, ``tests`` and ``dcbnode`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._benchlib import (
    REPO,
    SourceFactory,
    Target,
    machine_info,
    print_table,
    series_info,
    summarize,
    write_results,
)
from bench.ctseries import CACHE_DIR, cached_ct_series
from bench.peer_get_rates import dcmqrscp_source, measure_get_rate, series_keys
from tests.conftest import start_node, stop_node

__all__ = ["dcbnode_source", "htj2k_get_once", "loaded_data_dir", "main", "node_peak_rss"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------- dcbnode as a source


def loaded_data_dir(files: Sequence[Path], key: str) -> Path:
    """A dcbnode data directory holding ``files``, stored once through the library and cached."""
    from dcbnode.archive import Archive
    from dcbnode.index.schema import head_revision

    data_dir = CACHE_DIR / "retrieve" / key
    done = data_dir / ".loaded"
    # Loaded by an older dcbnode (index schema revision): load again, a node refuses to serve it.
    marker = f"{len(files)}\nschema {head_revision()}\n"
    if done.exists() and done.read_text() == marker:
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    started = time.perf_counter()
    archive = Archive(data_dir, f"sqlite:///{data_dir / 'index.sqlite'}")
    try:
        for path in files:
            archive.store(path.read_bytes(), source_ae_title="BENCH")
    finally:
        archive.close()
    done.write_text(marker)
    print(f"  loaded {len(files)} instances into {data_dir} in {time.perf_counter() - started:.1f} s", flush=True)
    return data_dir


@contextlib.contextmanager
def _node(data_dir: Path) -> Iterator[Any]:
    with tempfile.TemporaryDirectory(prefix="bench-dcbnode-") as tmp:
        node = start_node(Path(tmp), data_dir=data_dir, log_level="WARNING")
        try:
            yield node
        finally:
            code = stop_node(node)
            if code != 0:
                raise RuntimeError(f"dcbnode exited {code}: {node.log()[-2000:]}")


def dcbnode_source(data_dir: Path) -> SourceFactory:
    """A :data:`SourceFactory` serving the already-loaded ``data_dir`` (the files argument is ignored)."""

    @contextlib.contextmanager
    def factory(files: Sequence[Path]) -> Iterator[Target]:
        with _node(data_dir) as node:
            yield node.host, node.port, node.aet

    return factory


# --------------------------------------------------------------------------- pynetdicom HTJ2K-only SCU


def htj2k_get_once(target: Target, keys: dict[str, str], expected: int, max_pdu: int) -> float:
    """One C-GET accepting only HTJ2K; each instance's bytes are written to a file. Returns seconds."""
    from pydicom.dataset import Dataset
    from pydicom.uid import HTJ2K, HTJ2KLossless
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    out = Path(tempfile.mkdtemp(prefix="bench-htj2k-"))
    count = [0]
    syntaxes: set[str] = set()

    def handle_store(event: Any) -> int:
        count[0] += 1
        syntaxes.add(str(event.context.transfer_syntax))
        (out / f"{count[0]}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="HTJ2KSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CT_IMAGE_STORAGE, [HTJ2KLossless])
    ae.add_requested_context(CT_IMAGE_STORAGE, [HTJ2K])
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    host, port, aet = target
    try:
        started = time.perf_counter()
        # the maximum PDU a requestor advertises is associate()'s max_pdu (AE.maximum_pdu_size: acceptors only)
        assoc = ae.associate(host, port, ae_title=aet, ext_neg=[build_role(CT_IMAGE_STORAGE, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)], max_pdu=max_pdu)
        if not assoc.is_established:
            raise RuntimeError("HTJ2K C-GET: association not established")
        final = None
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            final = status
        assoc.release()
        elapsed = time.perf_counter() - started
        if final is None or final.Status != 0x0000 or count[0] != expected or syntaxes - {HTJ2KLossless, HTJ2K}:
            raise RuntimeError(f"HTJ2K C-GET: status {final and hex(final.Status)}, {count[0]} of {expected} "
                               f"instances, syntaxes {sorted(syntaxes)}")
        return elapsed
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure_htj2k_rate(data_dir: Path, files: Sequence[Path], repeats: int, max_pdu: int,
                       seconds_out: list[float]) -> float:
    keys = series_keys(files)
    with _node(data_dir) as node:
        target = (node.host, node.port, node.aet)
        htj2k_get_once(target, keys, len(files), max_pdu)  # warm-up
        for _ in range(max(1, repeats)):
            seconds_out.append(htj2k_get_once(target, keys, len(files), max_pdu))
    return statistics.median(len(files) / s for s in seconds_out)


# --------------------------------------------------------------------------- memory


def _ct_small_copies(count: int) -> list[Path]:
    """``count`` copies of CT_small in one new series (cached, deterministic UIDs)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = CACHE_DIR / "retrieve" / f"ct-small-x{count}"
    done = folder / ".done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
        study = generate_uid(entropy_srcs=["retrieve-rate", str(count), "study"])
        series = generate_uid(entropy_srcs=["retrieve-rate", str(count), "series"])
        for index in range(count):
            source.StudyInstanceUID, source.SeriesInstanceUID = study, series
            uid = generate_uid(entropy_srcs=["retrieve-rate", str(count), str(index)])
            source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = uid
            source.InstanceNumber = index + 1
            source.save_as(folder / f"{index:05d}.dcm", enforce_file_format=True)
        done.write_text(f"{count}\n")
    return sorted(folder.glob("*.dcm"))


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def node_peak_rss(count: int) -> dict[str, Any]:
    """Node RSS before, and peak (VmHWM) during, a getscu C-GET of ``count`` CT_small copies."""
    from bench.peer_get_rates import get_once

    files = _ct_small_copies(count)
    data_dir = loaded_data_dir(files, f"archive-ct-small-x{count}")
    keys = series_keys(files)
    with _node(data_dir) as node:
        pid = node.process.pid
        time.sleep(0.5)
        before = _rss_kib(pid, "VmRSS")
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, KeyError, ValueError):
                    samples.append(_rss_kib(pid, "VmRSS"))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            seconds = get_once((node.host, node.port, node.aet), keys, len(files))
        finally:
            stop.set()
            sampler.join()
        peak = _rss_kib(pid, "VmHWM")
    return {"instances": count, "seconds": seconds, "per_s": count / seconds, "rss_before_mib": before / 1024,
            "rss_peak_mib": peak / 1024, "rss_sampled_max_mib": max(samples, default=0) / 1024}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="CT slices in the series (default 300)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=2000, help="instances for the memory run (0: skip)")
    parser.add_argument("--max-pdu", type=int, default=0,
                        help="maximum PDU the HTJ2K pynetdicom SCU advertises (default 0 = unlimited)")
    parser.add_argument("--skip-dcmqrscp", action="store_true", help="only measure dcbnode")
    parser.add_argument("--json", type=Path, default=None, help="output (default bench/results/...)")
    args = parser.parse_args(argv)

    files = cached_ct_series(args.count)
    info = series_info(files)
    print(f"series: {info['count']} × {info['rows']}×{info['columns']} CT, {info['bytes'] / 1e6:.1f} MB", flush=True)
    data_dir = loaded_data_dir(files, "archive-" + files[0].parent.name)
    rows = []
    sources: dict[str, SourceFactory] = {"dcbnode (getscu, native)": dcbnode_source(data_dir)}
    if not args.skip_dcmqrscp:
        sources = {"dcmtk-dcmqrscp (getscu)": dcmqrscp_source, **sources}
    for name, factory in sources.items():
        seconds: list[float] = []
        measure_get_rate(factory, files, repeats=args.repeats, seconds_out=seconds)
        rows.append(summarize(name, [len(files) / s for s in seconds], seconds))
        print(f"  {name}: {rows[-1]['median_per_s']:.1f} instances/s", flush=True)
    seconds = []
    measure_htj2k_rate(data_dir, files, args.repeats, args.max_pdu, seconds)
    rows.append(summarize(f"dcbnode (pynetdicom SCU, HTJ2K only, max PDU {args.max_pdu or 'unlimited'})",
                          [len(files) / s for s in seconds], seconds))
    print(f"  {rows[-1]['target']}: {rows[-1]['median_per_s']:.1f} instances/s", flush=True)
    print_table("C-GET of the CT series (instances/s)", rows, info["bytes"] / len(files) / 1e6)

    reference = next((r["median_per_s"] for r in rows if r["target"].startswith("dcmtk")), None)
    ratios = {}
    if reference:
        for row, target in ((rows[1], 1.0), (rows[2], 1.5)):
            ratios[row["target"]] = {"ratio": row["median_per_s"] / reference, "target": target}
            mark = "ok" if row["median_per_s"] / reference >= target else "MISSED"
            print(f"  {row['target']}: {row['median_per_s'] / reference:.2f}× dcmqrscp (target ≥ {target}×) {mark}")
    memory = node_peak_rss(args.instances) if args.instances > 0 else None
    if memory:
        print(f"\nmemory: C-GET of {memory['instances']} CT_small instances at {memory['per_s']:.0f}/s; node RSS "
              f"{memory['rss_before_mib']:.0f} MiB before, peak {memory['rss_peak_mib']:.0f} MiB")
    payload = {
        "benchmark": "retrieve_rate",
        "description": "SERIES-level C-GET of the CT series: DCMTK getscu (TCP_NODELAY=1, -S, default "
                       "uncompressed contexts) from dcmqrscp and from dcbnode; a pynetdicom SCU accepting "
                       "only HTJ2K from dcbnode. Rate = instances / wall time of the whole C-GET.",
        "series": info,
        "repeats": args.repeats,
        "max_pdu_htj2k_scu": args.max_pdu,
        "machine": machine_info(),
        "results": rows,
        "ratios_vs_dcmqrscp": ratios,
        "memory": memory,
        "repo": str(REPO),
    }
    print(f"\nwrote {write_results('retrieve_rate', payload, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
