"""Worker processes behind one port, and several writers on one archive (issue 12).

Load comes from separate DCMTK ``storescu`` processes, one per association (threads of one pynetdicom
process stall under CPU load and would be blamed on the node: see NOTES.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from conftest import (
    POSTGRES_ENV,
    REPO,
    _postgres_database,
    child_pids,
    compression_done,
    indexed_count,
    read_back,
    rebuilt_part10,
    stop_node,
    wait_until,
)
from faithful import ct_series, element_differences, pixels_equal, read
from peers import dcmtk_env, dcmtk_tool
from pydicom.dataset import FileMetaDataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dcbnode.dcbs import Volume, live_instances


def _write(datasets: Sequence[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for number, ds in enumerate(datasets):
        # DCMTK's storescu re-encodes what it sends and leaves Data Set Trailing Padding out: what is
        # written here is what the node receives.
        if 0xFFFCFFFC in ds:
            del ds[0xFFFCFFFC]
        path = folder / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _storescu(node, files: Sequence[Path], calling_aet: str) -> subprocess.Popen[str]:
    """One association of DCMTK ``storescu`` sending ``files`` in order (verbose: one line per response)."""
    return subprocess.Popen([dcmtk_tool("storescu"), "-v", "-aet", calling_aet, "-aec", node.aet, node.host,
                             str(node.port), *map(str, files)], env=dcmtk_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


#: A Success response as DCMTK 3.6.7 and later versions word it.
_SUCCESS = re.compile(r"Received Store Response \((Success|Status: 0x0000)")


def _acknowledged(output: str) -> list[str]:
    """The files ``storescu -v`` got a Success response for."""
    done, sending = [], None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            sending = line.removeprefix("I: Sending file: ").strip()
        elif _SUCCESS.search(line) and sending is not None:
            done.append(sending)
            sending = None
    return done


def _assert_stored_bit_exact(archive, sent: dict[str, tuple[pydicom.Dataset, str | None]]) -> None:
    """Every instance of ``sent`` (UID → dataset, calling AE title that sent it, None for one imported by
    ``dcbnode-admin import``) comes back bit-exact."""
    for uid, (ds, aet) in sent.items():
        rebuilt = read(rebuilt_part10(archive, uid))
        expected = ds.copy()
        expected.file_meta = ds.file_meta.copy()
        if aet is None:  # the file meta's Source AE title says who wrote the file: not compared
            del expected.file_meta.SourceApplicationEntityTitle
            rebuilt.file_meta.pop(0x00020016, None)
        else:
            expected.file_meta.SourceApplicationEntityTitle = aet
        assert element_differences(expected, rebuilt) == [], uid
        assert pixels_equal(expected, rebuilt), uid


def _live_counts(data_dir: Path) -> list[int]:
    counts = []
    for path in sorted((data_dir / "volumes").rglob("*.dcbs")):
        with Volume.open(path) as volume:
            counts.append(len(live_instances(volume)))
    return sorted(counts)


def _workers_serving(log: str) -> set[str]:
    """The workers that logged an association."""
    return set(re.findall(r"\[(w\d+)\] dcbnode\.association: association", log))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (the tests sharing one index between nodes need a server)."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"set {POSTGRES_ENV} to run the tests of several nodes on one index")
    yield from _postgres_database(base)


# ``database_url`` before ``running_node``: fixtures are torn down in reverse, so the nodes are stopped
# before the PostgreSQL database is dropped.
def test_eight_associations_over_four_workers_store_two_interleaved_series(database_url, running_node,
                                                                            tmp_path):
    """Eight storescu associations, over four workers, each sending every eighth slice of the same two
    series, alternating between them, while the node's compressor and ``dcbnode-admin compact`` rewrite
    the volumes: every instance is stored once, one volume per series, bit-exact."""
    node = running_node(workers=4, max_associations=10, database_url=database_url, compression_delay=0.05)
    study = pydicom.uid.generate_uid()
    series = [ct_series(32, series_uid=pydicom.uid.generate_uid(), study_uid=study) for _ in range(2)]
    paths = {str(ds.SOPInstanceUID): path for s, name in zip(series, "ab", strict=True)
             for ds, path in zip(s, _write(s, tmp_path / name), strict=True)}
    jobs = []
    for k in range(8):
        datasets = [ds for pair in zip(series[0][k::8], series[1][k::8], strict=True) for ds in pair]
        jobs.append((f"SCU{k}", datasets))

    compacting = threading.Event()
    compactions: list[int] = []

    def compact() -> None:  # an archive-level writer racing the node's appends
        while not compacting.is_set():
            done = subprocess.run([sys.executable, "-m", "dcbnode.cli.admin", "--config", str(node.config_path),
                                   "--json", "compact"], cwd=REPO, capture_output=True, text=True, timeout=120)
            compactions.append(done.returncode)

    compactor = threading.Thread(target=compact)
    compactor.start()
    try:
        senders = [_storescu(node, [paths[str(ds.SOPInstanceUID)] for ds in datasets], aet) for aet, datasets in jobs]
        outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    finally:
        compacting.set()
        compactor.join(180)
    assert [sender.returncode for sender in senders] == [0] * 8, outputs
    assert sum(len(_acknowledged(output)) for output in outputs) == 64
    assert compactions and set(compactions) == {0}

    assert wait_until(lambda: compression_done(node.data_dir, database_url), timeout=120), node.log()[-3000:]
    assert stop_node(node) == 0
    assert len(_workers_serving(node.log())) >= 2, node.log()[-3000:]
    assert "database is locked" not in node.log()
    assert _live_counts(node.data_dir) == [32, 32]  # one volume file per series, each instance once
    archive = read_back(node.data_dir, database_url)
    try:
        assert indexed_count(archive) == 64
        _assert_stored_bit_exact(archive, {str(ds.SOPInstanceUID): (ds, aet) for aet, sent in jobs for ds in sent})
    finally:
        archive.close()


def _worker_pids(node) -> dict[str, int]:
    """The workers' pids by name, from the main process's "started w1 (pid N)" lines (the latest each)."""
    return {name: int(pid) for name, pid in re.findall(r"started (w\d+) \(pid (\d+)\)", node.log())}


def _associate(node, calling_aet: str):
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    return ae.associate(node.host, node.port, ae_title=node.aet)


def _established(node, calling_aet: str):
    """An association, retried while the node is at its limit (for up to 10 s)."""
    attempts = []
    assert wait_until(lambda: attempts.append(_associate(node, calling_aet)) or attempts[-1].is_established)
    return attempts[-1]


def test_kill_9_of_a_worker_mid_store(database_url, running_node, tmp_path):
    """A worker killed mid-store: the node keeps serving, every acknowledged instance is kept, the worker
    is back within seconds; and max_associations still holds across the workers."""
    node = running_node(workers=2, max_associations=3, database_url=database_url)
    study = pydicom.uid.generate_uid()
    datasets = ct_series(400, series_uid=pydicom.uid.generate_uid(), study_uid=study)
    by_path = {str(path): ds for ds, path in zip(datasets, _write(datasets, tmp_path / "series"), strict=True)}
    files = list(by_path)
    senders = [_storescu(node, [Path(f) for f in files[k::2]], f"SCU{k}") for k in range(2)]
    watcher = read_back(node.data_dir, database_url)
    try:
        assert wait_until(lambda: indexed_count(watcher) >= 60, timeout=120)  # well into the stores
    finally:
        watcher.close()
    victim = _worker_pids(node)["w1"]
    assert victim in child_pids(node.process.pid)
    os.kill(victim, signal.SIGKILL)
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    acknowledged = [path for output in outputs for path in _acknowledged(output)]
    assert len(acknowledged) > 0, outputs

    assert wait_until(lambda: _worker_pids(node).get("w1") not in (None, victim), timeout=15), node.log()[-3000:]
    # Restarted at once if it had served for 30 s, else after a 1 s pause (its first failure in a row).
    assert re.search(rf"w1 \(pid {victim}\) died: killed by SIGKILL, [\d.]+ s after its start; "
                     r"restarting it (now|in 1 s \(failure 1 in a row\))\n", node.log()), node.log()[-3000:]
    # The node serves: everything again, from one association (what was stored is a duplicate: kept as is).
    again = subprocess.run([dcmtk_tool("storescu"), "-aet", "RESEND", "-aec", node.aet, node.host, str(node.port),
                            *files], env=dcmtk_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]

    # max_associations over both workers: three held (wherever they landed), a fourth refused.
    # (A slot comes back when the connection closes, a moment after the storescu above saw its release.)
    held = [_established(node, f"HOLD{n}") for n in range(3)]
    try:
        for _ in range(4):  # each attempt lands on whichever worker accepts first
            refused = _associate(node, "FOURTH")
            assert refused.is_rejected
            primitive = refused.acceptor.primitive
            assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
    finally:
        for assoc in held:
            assoc.release()

    assert stop_node(node) == 0
    archive = read_back(node.data_dir, database_url)
    try:
        sent_by = {}
        for k, output in enumerate(outputs):
            for path in _acknowledged(output):
                sent_by[str(by_path[path].SOPInstanceUID)] = (by_path[path], f"SCU{k}")
        _assert_stored_bit_exact(archive, sent_by)
        assert indexed_count(archive) == 400
    finally:
        archive.close()


def test_two_nodes_on_one_postgresql_index_and_data_folder(postgres_url, running_node, tmp_path):
    """Two nodes (two hosts, here two ports) share one PostgreSQL index and one data folder and store into
    the same series at once: every instance back bit-exact from either node, and verify passes."""
    data_dir = tmp_path / "shared-data"
    first = running_node(name="first", data_dir=data_dir, database_url=postgres_url, workers=2,
                         compression_delay=0.05)
    second = running_node(name="second", data_dir=data_dir, database_url=postgres_url, workers=2,
                          compression_delay=0.05)
    datasets = ct_series(60, series_uid=pydicom.uid.generate_uid(), study_uid=pydicom.uid.generate_uid())
    paths = _write(datasets, tmp_path / "series")
    senders = [_storescu(node, paths[k::4], f"SCU{k}") for k, node in enumerate((first, second, first, second))]
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    assert [sender.returncode for sender in senders] == [0] * 4, outputs
    assert sum(len(_acknowledged(output)) for output in outputs) == 60

    getscu = dcmtk_tool("getscu")
    for node in (first, second):
        out = tmp_path / f"got-{node.port}"
        out.mkdir()
        got = subprocess.run([getscu, "-S", "-aec", node.aet, "-k", "QueryRetrieveLevel=STUDY", "-k",
                              f"StudyInstanceUID={datasets[0].StudyInstanceUID}", "-od", str(out), node.host,
                              str(node.port)], env=dcmtk_env(), capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-2000:]
        received = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, out.iterdir())}
        assert len(received) == 60
        for k, ds in enumerate(datasets):
            rebuilt = received[str(ds.SOPInstanceUID)]
            expected = ds.copy()
            expected.file_meta = FileMetaDataset()  # a C-STORE carries no file meta: getscu writes its own
            assert element_differences(expected, rebuilt) == [], k
            assert pixels_equal(ds, rebuilt), k

    assert wait_until(lambda: compression_done(data_dir, postgres_url), timeout=120)
    verify = subprocess.run([sys.executable, "-m", "dcbnode.cli.admin", "--config", str(first.config_path), "--json",
                             "verify"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert stop_node(first) == 0 and stop_node(second) == 0
    assert _live_counts(data_dir) == [60]
    archive = read_back(data_dir, postgres_url)
    try:
        _assert_stored_bit_exact(archive, {str(ds.SOPInstanceUID): (ds, f"SCU{k % 4}")
                                           for k, ds in enumerate(datasets)})
    finally:
        archive.close()



def test_admin_import_and_two_workers_store_into_one_series_at_once(database_url, running_node, tmp_path):
    """``dcbnode-admin import`` and two storescu associations (on the node's two workers) append to the
    same series volume at once: every instance once, in one volume, bit-exact; no "database is locked"."""
    node = running_node(workers=2, database_url=database_url)
    datasets = ct_series(90, series_uid=pydicom.uid.generate_uid(), study_uid=pydicom.uid.generate_uid())
    paths = _write(datasets, tmp_path / "series")
    imported = tmp_path / "imported"
    imported.mkdir()
    for path in paths[2::3]:
        path.rename(imported / path.name)
    importer = subprocess.Popen([sys.executable, "-m", "dcbnode.cli.admin", "--config", str(node.config_path),
                                 "--json", "import", str(imported)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    senders = [_storescu(node, paths[k:len(paths):3], f"SCU{k}") for k in range(2)]
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    out, err = importer.communicate(timeout=300)
    assert importer.returncode == 0, out[-2000:] + err[-2000:]
    assert [sender.returncode for sender in senders] == [0, 0], outputs
    assert sum(len(_acknowledged(output)) for output in outputs) == 60
    assert stop_node(node) == 0
    assert "database is locked" not in node.log() + err
    assert _live_counts(node.data_dir) == [90]
    archive = read_back(node.data_dir, database_url)
    try:
        assert indexed_count(archive) == 90
        _assert_stored_bit_exact(archive, {str(ds.SOPInstanceUID): (ds, f"SCU{k % 3}" if k % 3 != 2 else None)
                                           for k, ds in enumerate(datasets)})
    finally:
        archive.close()


def _getscu(node, study_uid: str, out: Path) -> list[pydicom.Dataset]:
    out.mkdir()
    got = subprocess.run([dcmtk_tool("getscu"), "-S", "-aec", node.aet, "-k", "QueryRetrieveLevel=STUDY", "-k",
                          f"StudyInstanceUID={study_uid}", "-od", str(out), node.host, str(node.port)],
                         env=dcmtk_env(), capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    return [pydicom.dcmread(path) for path in sorted(out.iterdir())]


def _rebuild_helpers(worker: int) -> list[int]:
    """The worker's rebuild helper processes (multiprocessing's spawned children)."""
    return [pid for pid in child_pids(worker)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _ready_helpers(node) -> int:
    """How many rebuild helpers the node's workers have started so far (each logs when ready)."""
    return len(re.findall(r"rebuild helper process \d+ ready", node.log()))


def test_retrieve_rebuilds_in_a_helper_process_and_survives_its_death(running_node, tmp_path):
    """A C-GET's instances are rebuilt in a helper process of the worker (outside its GIL), started by the
    first retrieve; a helper killed between two retrieves fails nothing: the next retrieve is served in
    full, bit-exact, and a new helper is started.  (By default there is none: see the next test.)"""
    node = running_node(workers=1, tables={"retrieve": {"rebuild_helpers": 1}})
    datasets = ct_series(30, series_uid=pydicom.uid.generate_uid(), study_uid=pydicom.uid.generate_uid())
    sender = _storescu(node, _write(datasets, tmp_path / "series"), "SCU")
    assert sender.wait(300) == 0
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    worker = _worker_pids(node)["w1"]
    for attempt in range(2):
        received = _getscu(node, str(datasets[0].StudyInstanceUID), tmp_path / f"got{attempt}")
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(by_uid)
        for ds in received:
            original = by_uid[str(ds.SOPInstanceUID)]
            expected = original.copy()
            expected.file_meta = FileMetaDataset()  # a C-STORE carries no file meta: getscu writes its own
            assert element_differences(expected, ds) == [] and pixels_equal(original, ds)
        # Until its helper is ready a retrieve rebuilds in its own thread; then the helper takes over.
        assert wait_until(lambda started=attempt + 1: _ready_helpers(node) == started, 60), node.log()[-2000:]
        helpers = _rebuild_helpers(worker)
        assert len(helpers) == 1, node.log()[-2000:]
        if attempt == 0:
            assert f"rebuild helper process {helpers[0]} ready" in node.log()
            os.kill(helpers[0], signal.SIGKILL)
            assert wait_until(lambda: not _rebuild_helpers(worker))
    assert "a rebuild helper process ended" in node.log()


def test_retrieve_rebuilds_in_the_worker_by_default(running_node, tmp_path):
    """Without ``[retrieve] rebuild_helpers`` a C-GET is rebuilt by a thread of its worker: no helper
    process is started, and the instances come back bit-exact."""
    node = running_node(workers=1)
    datasets = ct_series(5, series_uid=pydicom.uid.generate_uid(), study_uid=pydicom.uid.generate_uid())
    assert _storescu(node, _write(datasets, tmp_path / "series"), "SCU").wait(300) == 0
    received = _getscu(node, str(datasets[0].StudyInstanceUID), tmp_path / "got")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(by_uid)
    assert all(pixels_equal(by_uid[str(ds.SOPInstanceUID)], ds) for ds in received)
    assert _rebuild_helpers(_worker_pids(node)["w1"]) == [] and _ready_helpers(node) == 0
