"""Concurrent associations and crashes: every acknowledged instance is stored exactly once."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pydicom
from conftest import compression_done, indexed_count, read_back, rebuilt_part10, stop_node, wait_until
from faithful import ct_series, element_differences, pixels_equal, read
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dcbnode.archive.recovery import volume_files
from dcbnode.dcbs import Volume, live_instances


def _series(count: int, series_uid: str, study_uid: str) -> list[pydicom.Dataset]:
    return ct_series(count, series_uid=series_uid, study_uid=study_uid)


def _send(node, datasets, acknowledged: list[str], calling_aet: str, errors: list[str], pause: float = 0.0) -> None:
    ae = AE(ae_title=calling_aet)
    # Short timeouts: after the kill -9 the SCU must notice the dead peer quickly.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(CTImageStorage, str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    if not assoc.is_established:
        errors.append(f"{calling_aet}: not established")
        return
    try:
        for number, ds in enumerate(datasets):
            if pause and number % 2:
                time.sleep(pause)  # let the series go quiet for a moment
            status = assoc.send_c_store(ds)
            if "Status" in status and status.Status == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
            elif not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _live_counts(data_dir: Path) -> dict[str, int]:
    counts = {}
    for path in sorted((data_dir / "volumes").rglob("*.dcbs")):
        with Volume.open(path) as volume:
            counts[path.name] = len(live_instances(volume))
    return counts


def _send_interleaved(node, pause: float = 0.0) -> list[tuple[list[pydicom.Dataset], str]]:
    """Four 12-slice series of one study over eight simultaneous associations, two per series, each sending
    every other slice, so that the series interleave; every instance must be acknowledged.  Returns the
    ``(datasets, calling AE title)`` of each association."""
    study = pydicom.uid.generate_uid()
    series = [_series(12, pydicom.uid.generate_uid(), study) for _ in range(4)]
    jobs = [(s[parity::2], f"SCU{i}") for i, (s, parity) in enumerate((s, p) for s in series for p in (0, 1))]
    acknowledged: list[str] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_send, args=(node, ds, acknowledged, aet, errors, pause)) for ds, aet in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    every = [str(ds.SOPInstanceUID) for s in series for ds in s]
    assert sorted(acknowledged) == sorted(every)
    return jobs


# ``database_url`` before ``running_node``: fixtures are torn down in reverse, so the nodes are stopped
# before the PostgreSQL database is dropped.
def test_eight_concurrent_associations_interleaved_series(database_url, running_node):
    node = running_node(max_associations=10, database_url=database_url)
    _send_interleaved(node)
    assert stop_node(node) == 0
    assert sorted(_live_counts(node.data_dir).values()) == [12, 12, 12, 12]
    archive = read_back(node.data_dir, database_url)
    assert indexed_count(archive) == 48
    archive.close()


def test_deferred_compression_interleaved_with_eight_associations(database_url, running_node):
    """Series compressed while their instances still arrive: the compressions (new generations) race the
    appends of eight associations.  Every instance ends up stored once, compressed and bit-exact."""
    node = running_node(max_associations=10, database_url=database_url, compression_delay=0.05)
    jobs = _send_interleaved(node, pause=0.15)

    assert wait_until(lambda: compression_done(node.data_dir, database_url), timeout=60), node.log()[-3000:]
    assert stop_node(node) == 0
    assert node.log().count("compressed volumes/") >= 5, "compression did not interleave with the ingest"
    assert sorted(_live_counts(node.data_dir).values()) == [12, 12, 12, 12]  # one file per series
    archive = read_back(node.data_dir, database_url)
    try:
        assert indexed_count(archive) == 48
        for aet, ds in ((aet, ds) for sent, aet in jobs for ds in sent):
            with archive.open_instance(str(ds.SOPInstanceUID)) as stored:
                assert {entry.codec for entry in stored.meta.frames} == {"htj2k-shared"}
            rebuilt = read(rebuilt_part10(archive, str(ds.SOPInstanceUID)))
            ds.file_meta.SourceApplicationEntityTitle = aet
            assert element_differences(ds, rebuilt) == []
            assert pixels_equal(ds, rebuilt)
    finally:
        archive.close()


def test_kill_9_during_ingest_keeps_every_acknowledged_instance(database_url, running_node):
    node = running_node(database_url=database_url)
    datasets = _series(150, pydicom.uid.generate_uid(), pydicom.uid.generate_uid())
    acknowledged: list[str] = []
    errors: list[str] = []
    sender = threading.Thread(target=_send, args=(node, datasets, acknowledged, "CRASHSCU", errors))
    sender.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 40 and time.monotonic() < deadline and sender.is_alive():
        time.sleep(0.01)
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(10)
    sender.join(60)
    assert 40 <= len(acknowledged) < 150, len(acknowledged)

    again = running_node(name="restarted", data_dir=node.data_dir, database_url=database_url)
    assert "recovery:" in again.log()
    assert stop_node(again) == 0
    archive = read_back(node.data_dir, database_url)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for uid in acknowledged:
        rebuilt = read(rebuilt_part10(archive, uid))
        original = by_uid[uid]
        original.file_meta.SourceApplicationEntityTitle = "CRASHSCU"
        assert element_differences(original, rebuilt) == []
        assert pixels_equal(original, rebuilt)
    assert indexed_count(archive) >= len(acknowledged)
    for path in volume_files(archive):  # every record of every volume passes its checks
        with Volume.open(path) as volume:
            for entry in volume.records():
                volume.read_meta(entry.location.offset)
    archive.close()
