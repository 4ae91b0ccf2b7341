"""kill -9 soak: the node is killed (SIGKILL, workers and compressor with it) at random moments while it
ingests, retrieves, compresses deferred series and ``dcbnode-admin compact`` rewrites volumes, then
restarted, cycle after cycle.  At the end every instance that was ever acknowledged must come back
bit-exact (every element, every pixel) and ``dcbnode-admin verify`` must pass.

Each cycle: a fresh 8-slice CT series is stored over one association (``duplicate_policy = "replace"``:
a few earlier instances are sent again, so that volumes hold dead records for compact), DCMTK ``getscu``
retrieves an earlier study, ``dcbnode-admin compact`` runs, deferred compression runs after 0.2 s of
quiet; after 0.3-1.5 s (random) the node and the compact are killed.

Run: ``python bench/soak.py [--cycles 20] [--database-url URL] [--seed N]``; prints one line per cycle
and the totals (cycles, instances acknowledged, lost: must be 0).  ``tests/test_soak.py`` runs 3 cycles.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pydicom  # noqa: E402
from conftest import read_back, rebuilt_part10, start_node, stop_node  # noqa: E402
from faithful import ct_series, element_differences, pixels_equal, read  # noqa: E402
from peers import dcmtk_env, dcmtk_tool  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage  # noqa: E402

CALLING_AET = "SOAKSCU"


@dataclass
class SoakResult:
    """What a soak did and found."""

    cycles: int = 0
    acknowledged: dict[str, pydicom.Dataset] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    verify_output: str = ""
    verify_status: int = -1

    @property
    def clean(self) -> bool:
        return not self.lost and not self.differing and self.verify_status == 0


def _store(node, datasets: list[pydicom.Dataset], result: SoakResult) -> None:
    """Send ``datasets`` over one association until the node dies; record every Success."""
    ae = AE(ae_title=CALLING_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(CTImageStorage, str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    if not assoc.is_established:
        return
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            if "Status" in status and status.Status == 0:
                result.acknowledged[str(dataset.SOPInstanceUID)] = dataset
            elif not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _cycle(node, rng: random.Random, result: SoakResult, workdir: Path) -> None:
    series = ct_series(8, series_uid=pydicom.uid.generate_uid(), study_uid=pydicom.uid.generate_uid())
    again = rng.sample(list(result.acknowledged.values()), min(3, len(result.acknowledged)))
    sender = threading.Thread(target=_store, args=(node, [*series, *again], result))
    sender.start()
    helpers = []
    if result.acknowledged:
        study = next(iter(result.acknowledged.values())).StudyInstanceUID
        out = workdir / f"get-{result.cycles}"
        out.mkdir()
        helpers.append(subprocess.Popen(
            [dcmtk_tool("getscu"), "-S", "-aet", "SOAKGET", "-aec", node.aet, "-od", str(out), "-k",
             "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", node.host, str(node.port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    helpers.append(subprocess.Popen([sys.executable, "-m", "dcbnode.cli.admin", "--config", str(node.config_path),
                                     "compact"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(rng.uniform(0.3, 1.5))
    node.process.send_signal(signal.SIGKILL)  # the workers and the compressor die with it (PDEATHSIG)
    node.process.wait(10)
    for helper in helpers:
        helper.send_signal(signal.SIGKILL)
        helper.wait(10)
    sender.join(60)
    result.cycles += 1


def soak(cycles: int, workdir: Path, database_url: str = "", seed: int = 0, log=print) -> SoakResult:
    """Run ``cycles`` kill -9 cycles on a node with its data in ``workdir``; then check everything."""
    rng = random.Random(seed)
    result = SoakResult()
    settings = {"database_url": database_url, "compression_delay": 0.2, "duplicate_policy": "replace",
                "dimse_timeout": 10}
    data_dir = workdir / "data"
    for number in range(cycles):
        node = start_node(workdir, name=f"cycle{number}", data_dir=data_dir, **settings)
        before = len(result.acknowledged)
        _cycle(node, rng, result, workdir)
        log(f"cycle {number + 1}: {len(result.acknowledged) - before} new instance(s) acknowledged, "
            f"{len(result.acknowledged)} in all")
    node = start_node(workdir, name="final", data_dir=data_dir, **settings)
    assert stop_node(node) == 0, node.log()[-3000:]
    verify = subprocess.run([sys.executable, "-m", "dcbnode.cli.admin", "--config", str(node.config_path), "verify"],
                            cwd=REPO, capture_output=True, text=True, check=False)
    result.verify_status, result.verify_output = verify.returncode, verify.stdout + verify.stderr
    archive = read_back(data_dir, database_url)
    try:
        for uid, original in result.acknowledged.items():
            try:
                rebuilt = read(rebuilt_part10(archive, uid))
            except KeyError:
                result.lost.append(uid)
                continue
            original.file_meta.SourceApplicationEntityTitle = CALLING_AET
            if element_differences(original, rebuilt) or not pixels_equal(original, rebuilt):
                result.differing.append(uid)
    finally:
        archive.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (default: the SQLite index)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dcbnode-soak-") as folder:
        result = soak(args.cycles, Path(folder), args.database_url, args.seed)
    print(f"{result.cycles} kill -9 cycles in {time.monotonic() - started:.0f} s: {len(result.acknowledged)} "
          f"instance(s) acknowledged, {len(result.lost)} lost, {len(result.differing)} not bit-exact; "
          f"dcbnode-admin verify exit {result.verify_status}")
    if result.verify_status != 0:
        print(result.verify_output)
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.exit(main())
