"""Deferred compression: instances stored uncompressed (codec ``raw``) and compressed later by compaction.

The promise: what the node answers Success for comes back bit-exact at every moment — before the series
is compressed, after, and after a crash in the middle — and once compressed, a volume holds exactly the
bytes an inline (compress-before-acknowledging) store would have written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
from conftest import read_back, rebuilt_part10, start_node, stop_node, wait_until
from faithful import as_reencoded, element_differences, pixels_equal, read
from peers import run_storescu
from pydicom.data import get_testdata_file
from pydicom.uid import HTJ2KLossless, generate_uid

from dcbnode.archive import Archive, volume_path_for
from dcbnode.archive.compaction import compact_volume, compactable_volumes
from dcbnode.archive.compressor import Compressor
from dcbnode.archive.recovery import recover
from dcbnode.archive.verification import verify
from dcbnode.dcbs import Volume, VolumeFullError, append_instance, available_syntaxes, parse_instance, rebuild
from dcbnode.dcbs.record import Codec
from dcbnode.index.writer import compression_pending

#: Native files of every kind: 8/16-bit grey, RGB (HTJ2K colour transform), 16-bit RGB, multi-frame,
#: big endian, implicit VR, 1-bit (kept as zstd), 32-bit (kept as zstd), palette colour, odd sizes.
NATIVE_FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "SC_rgb_16bit.dcm",
                "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "liver_1frame.dcm", "rtdose_1frame.dcm",
                "SC_rgb_small_odd.dcm", "examples_overlay.dcm", "OBXXXX1A.dcm", "SC_rgb_32bit.dcm",
                "SC_rgb_2frame.dcm"]


def _paths(directory: Path) -> list[Path]:
    """The files, each with a SOP Instance UID of its own (several pydicom test files share one), in their
    original transfer syntaxes."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NATIVE_FILES:
        dataset = pydicom.dcmread(get_testdata_file(name, download=False))
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(directory / name)
        dataset.save_as(paths[-1], enforce_file_format=True)
        assert read(paths[-1].read_bytes()).file_meta.TransferSyntaxUID == dataset.file_meta.TransferSyntaxUID
    return paths


def _archive(path: Path) -> Archive:
    return Archive(path, f"sqlite:///{path / 'index.sqlite'}")


def _codecs(archive: Archive, sop_instance_uid: str) -> set[str]:
    with archive.open_instance(sop_instance_uid) as stored:
        return {entry.codec for entry in stored.meta.frames}


def _rebuilt_in_every_syntax(archive: Archive, sop_instance_uid: str) -> dict[str, bytes]:
    with archive.open_instance(sop_instance_uid) as stored:
        return {str(syntax): rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10()
                for syntax in available_syntaxes(stored.meta)}


def _volume_bodies(data_dir: Path) -> dict[str, bytes]:
    """Each volume file's bytes after its 64-byte file header (which holds a random volume id), by the
    volume's name without generation."""
    return {path.name.split(".")[0]: path.read_bytes()[64:] for path in (data_dir / "volumes").rglob("*.dcbs")}


def test_deferred_store_then_compression_equals_an_inline_store(tmp_path: Path) -> None:
    deferred, inline = _archive(tmp_path / "deferred"), _archive(tmp_path / "inline")
    try:
        uids = []
        paths = _paths(tmp_path / "in")
        for path in paths:
            data = path.read_bytes()
            uids.append(deferred.store(data, defer_compression=True).sop_instance_uid)
            inline.store(data)
        assert {frozenset(_codecs(deferred, uid)) for uid in uids} == {frozenset({Codec.RAW}), frozenset({Codec.ZSTD})}
        with deferred.index.engine.connect() as connection:
            pending = compression_pending(connection)
        assert sorted(pending) == sorted(deferred.pending.take_idle(0.0)) != []
        for stem in pending:
            deferred.pending.note(stem)

        # Before compression every output form, HTJ2K included (encoded on the fly), is byte for byte what
        # the inline store serves, and faithful to the original.
        for path, uid in zip(paths, uids, strict=True):
            rebuilt = _rebuilt_in_every_syntax(deferred, uid)
            assert rebuilt == _rebuilt_in_every_syntax(inline, uid), path.name
            assert HTJ2KLossless in rebuilt or path.name in ("liver_1frame.dcm", "rtdose_1frame.dcm",
                                                             "SC_rgb_32bit.dcm", "OBXXXX1A.dcm"), path.name
            original = read(path.read_bytes())
            received = read(rebuilt_part10(deferred, uid))
            assert element_differences(original, received) == [], path.name
            assert pixels_equal(original, received), path.name

        assert Compressor(deferred, delay=0).run_once() == len(pending)
        # Compressed, the volumes hold exactly the bytes the inline store wrote.
        assert _volume_bodies(tmp_path / "deferred") == _volume_bodies(tmp_path / "inline")
        assert not any(Codec.RAW in _codecs(deferred, uid) for uid in uids)
        for uid in uids:
            assert _rebuilt_in_every_syntax(deferred, uid) == _rebuilt_in_every_syntax(inline, uid)
        with deferred.index.engine.connect() as connection:
            assert compression_pending(connection) == []
        assert len(deferred.pending) == 0
        assert compactable_volumes(deferred) == []
    finally:
        deferred.close()
        inline.close()


def _series_copies(source: str, count: int, directory: Path) -> list[Path]:
    """``count`` copies of a pydicom test file as one new series, written to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    dataset = pydicom.dcmread(get_testdata_file(source, download=False))
    dataset.SeriesInstanceUID = generate_uid()
    paths = []
    for number in range(count):
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = number + 1
        paths.append(directory / f"{number:03d}.dcm")
        dataset.save_as(paths[-1], enforce_file_format=True)
    return paths


@contextlib.contextmanager
def _deferred_series(tmp_path: Path, count: int) -> Iterator[tuple[Archive, list[Path]]]:
    """An archive in ``tmp_path/data`` holding ``count`` copies of CT_small as one series, stored with
    deferred compression; closed afterwards."""
    files = _series_copies("CT_small.dcm", count, tmp_path / "in")
    archive = _archive(tmp_path / "data")
    try:
        for path in files:
            archive.store(path.read_bytes(), defer_compression=True)
        yield archive, files
    finally:
        archive.close()


def test_pending_compression_survives_a_restart(tmp_path: Path) -> None:
    files = _series_copies("CT_small.dcm", 3, tmp_path / "in")
    archive = _archive(tmp_path / "data")
    for path in files:
        archive.store(path.read_bytes(), defer_compression=True)
    archive.close()
    archive = _archive(tmp_path / "data")  # a new process: the index remembers
    try:
        assert len(archive.pending) == 1
        assert Compressor(archive, delay=0).run_once() == 1
    finally:
        archive.close()
    archive = _archive(tmp_path / "data")
    try:
        assert len(archive.pending) == 0
        assert all(_codecs(archive, read(p.read_bytes()).SOPInstanceUID) == {Codec.HTJ2K_SHARED} for p in files)
    finally:
        archive.close()


def test_recovery_marks_a_raw_record_it_indexes(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "data")
    try:
        (path,) = _series_copies("MR_small.dcm", 1, tmp_path / "in")
        encoded = parse_instance(path.read_bytes()).encode(defer_compression=True)
        relative = volume_path_for(encoded.meta.series_instance_uid)
        # A crash between the record's fsync and the index commit that would have marked the volume.
        with Volume.open(archive.volume_file(relative), writable=True, create=True) as volume:
            append_instance(volume, encoded)
        assert recover(archive).instances_indexed == 1
        with archive.index.engine.connect() as connection:
            assert compression_pending(connection) == [relative.removesuffix(".dcbs")]
        assert Compressor(archive, delay=0).run_once() == 1
        assert _codecs(archive, encoded.meta.sop_instance_uid) == {Codec.HTJ2K_SHARED}
    finally:
        archive.close()


def test_a_stop_during_compression_leaves_the_volume_as_it_was(tmp_path: Path) -> None:
    with _deferred_series(tmp_path, 4) as (archive, _):
        (volume,) = (tmp_path / "data" / "volumes").rglob("*.dcbs")
        before = volume.read_bytes()
        compressor = Compressor(archive, delay=0)
        assert compressor.stop()  # never started: stopping only sets the flag the compaction checks
        assert compressor.run_once() == 0
        assert volume.read_bytes() == before
        assert [p.name for p in volume.parent.iterdir()] == [volume.name]  # no temporary file left
        assert len(archive.pending) == 1  # still to do, here and in the index
        with archive.index.engine.connect() as connection:
            assert len(compression_pending(connection)) == 1


def test_a_duplicate_under_keep_first_leaves_one_record(tmp_path: Path) -> None:
    (path,) = _series_copies("CT_small.dcm", 1, tmp_path / "in")
    archive = _archive(tmp_path / "data")
    try:
        assert archive.store(path.read_bytes(), defer_compression=True).outcome.value == "stored"
        assert archive.store(path.read_bytes(), defer_compression=True).outcome.value == "duplicate ignored"
        (volume_path,) = (tmp_path / "data" / "volumes").rglob("*.dcbs")
        with Volume.open(volume_path) as volume:
            kinds = [entry.header.kind.name for entry in volume.records()]
        assert kinds == ["DICTIONARY", "INSTANCE"]  # the duplicate's record was cut back
    finally:
        archive.close()


def test_node_compresses_quiet_series_and_survives_a_kill_mid_compression(tmp_path: Path) -> None:
    """storescu sends a series; once it is quiet the node compresses it.  kill -9 while the compressed
    generation is being written; after a restart everything is still there, bit-exact, and compressed."""
    files = _series_copies("MR2_UNCI.dcm", 24, tmp_path / "in")  # 1024² slices: compression takes a while
    node = start_node(tmp_path, compression_delay=0.2)
    result = run_storescu(files, node.host, node.port, node.aet)
    assert result.returncode == 0, result.stderr
    volumes = node.data_dir / "volumes"
    assert wait_until(lambda: any(volumes.rglob(".*.tmp")), timeout=30), node.log()[-2000:]
    os.kill(node.process.pid, signal.SIGKILL)
    node.process.wait(10)
    assert any(volumes.rglob(".*.tmp")) or any(volumes.rglob("*.g2.dcbs"))  # killed mid-way
    node = start_node(tmp_path, data_dir=node.data_dir, port=node.port, compression_delay=0.2)
    try:
        assert wait_until(lambda: "compressed volumes/" in node.log(), timeout=60), node.log()[-2000:]
    finally:
        assert stop_node(node) == 0, node.log()[-2000:]
    assert not list(volumes.rglob(".*.tmp"))
    archive = read_back(node.data_dir)
    try:
        assert len(archive.pending) == 0
        for path in files:
            original = as_reencoded(read(path.read_bytes()))  # storescu re-encodes: compared by value
            uid = str(original.SOPInstanceUID)
            assert _codecs(archive, uid) == {Codec.HTJ2K_SHARED}
            received = read(rebuilt_part10(archive, uid))
            original.file_meta.SourceApplicationEntityTitle = received.file_meta.SourceApplicationEntityTitle
            assert element_differences(original, received) == []
            assert pixels_equal(original, received)
    finally:
        archive.close()


def test_compression_on_a_full_disk_leaves_the_volume_and_retries(small_filesystem: Path, tmp_path: Path) -> None:
    """The compressed generation is written beside the uncompressed one: with no room for it the
    compaction fails, the volume and its mark stay as they were, and a later round compresses it."""
    files = _series_copies("CT_small.dcm", 60, tmp_path / "in")  # 2.3 MB uncompressed, 0.9 MB compressed
    archive = _archive(small_filesystem / "data")
    try:
        stored = 0
        for path in files:
            try:
                archive.store(path.read_bytes(), defer_compression=True)
                stored += 1
            except VolumeFullError:
                break
        (volume,) = (small_filesystem / "data" / "volumes").rglob("*.dcbs")
        before = volume.read_bytes()
        compressor = Compressor(archive, delay=0)
        assert compressor.run_once() == 0  # ENOSPC while writing the new generation
        assert volume.read_bytes() == before
        assert [p.name for p in volume.parent.iterdir()] == [volume.name]
        with archive.index.engine.connect() as connection:
            assert len(compression_pending(connection)) == 1
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
        compressor._failed = dict.fromkeys(compressor._failed, 0.0)  # its retry is due (a minute later)
        compressor._retry_failed()
        assert compressor.run_once() == 1
        assert all(_codecs(archive, read(p.read_bytes()).SOPInstanceUID) == {Codec.HTJ2K_SHARED}
                   for p in files[:stored])
    finally:
        archive.close()


def test_a_store_racing_a_compaction_goes_into_the_new_generation(tmp_path: Path) -> None:
    """A store looks the series' volume up in the index, then compaction commits the next generation
    and unlinks the old file, then the store opens the path it looked up.  It must not create that file
    again beside the new generation (the series would be split over two files, and the second one never
    compressed): it looks again and appends to the new generation."""
    first, second = _series_copies("CT_small.dcm", 2, tmp_path / "in")
    archive = _archive(tmp_path / "data")
    try:
        archive.store(first.read_bytes(), defer_compression=True)
        archive._generations.clear()  # as in a fresh process: the next store asks the index
        looked_up = archive._current_generation
        raced = []

        def current_generation_then_compaction(relative: str) -> tuple[str, bool]:
            answer = looked_up(relative)
            if not raced:
                raced.append(Compressor(archive, delay=0).run_once())
            return answer

        archive._current_generation = current_generation_then_compaction  # type: ignore[method-assign]
        archive.store(second.read_bytes(), defer_compression=True)
        assert raced == [1]
        volumes = sorted(p.name for p in (tmp_path / "data" / "volumes").rglob("*.dcbs"))
        assert len(volumes) == 1 and ".g2." in volumes[0], volumes
        assert _codecs(archive, read(second.read_bytes()).SOPInstanceUID) == {Codec.RAW}
        assert Compressor(archive, delay=0).run_once() == 1
    finally:
        archive.close()


def test_the_index_marks_a_volume_whenever_its_file_holds_raw_frames(tmp_path: Path) -> None:
    """A store between the compressor taking a series and compacting it notes the series again; the
    compaction clears the index's mark with the old file, so the first raw record in the new
    generation must mark it again (else a crash would leave it uncompressed until the nightly run)."""
    first, second, third = _series_copies("CT_small.dcm", 3, tmp_path / "in")
    archive = _archive(tmp_path / "data")
    try:
        archive.store(first.read_bytes(), defer_compression=True)
        (stem,) = archive.pending.take_idle(0.0)  # the compressor takes the series...
        archive.store(second.read_bytes(), defer_compression=True)  # ...a store comes in between...
        assert compact_volume(archive, archive.current_volume_file(stem)) is not None  # ...then it compresses
        with archive.index.engine.connect() as connection:
            assert compression_pending(connection) == []
        archive.store(third.read_bytes(), defer_compression=True)  # raw, into the new generation
        with archive.index.engine.connect() as connection:
            assert compression_pending(connection) == [stem]
    finally:
        archive.close()


def test_a_volume_another_compaction_replaced_is_skipped(tmp_path: Path) -> None:
    """``dcbnode-admin compact`` lists the volumes, then the node's compressor replaces one of them
    before the admin gets to it: that one is skipped, not a failure."""
    with _deferred_series(tmp_path, 1) as (archive, _):
        (listed,) = compactable_volumes(archive)
        assert Compressor(archive, delay=0).run_once() == 1  # the node's compressor, first
        assert not listed.exists()
        assert compact_volume(archive, listed) is None


def test_a_compaction_waiting_for_another_on_the_same_volume_skips_it(tmp_path: Path) -> None:
    with _deferred_series(tmp_path, 3) as (archive, _):
        (volume,) = compactable_volumes(archive)
        second: list[object] = []
        waiter = threading.Thread(target=lambda: second.append(compact_volume(archive, volume)))

        def first_pauses(step: str) -> None:
            if step == "copying" and not waiter.is_alive() and not second:
                waiter.start()  # it opens the volume and waits for the lock this compaction holds
                wait_until(lambda: False, timeout=0.3)

        assert compact_volume(archive, volume, pause=first_pauses) is not None
        waiter.join(30)
        assert second == [None]
        assert len(list((tmp_path / "data" / "volumes").rglob("*.dcbs"))) == 1


def test_verify_while_the_node_compresses_reports_nothing(tmp_path: Path) -> None:
    """verify lists the volumes, the node's compressor replaces one by its next generation meanwhile:
    the new file is checked too, and the old one, gone and no longer indexed, is no problem."""
    with _deferred_series(tmp_path, 2) as (archive, files):
        compressed: list[int] = []

        def compress_after_the_listing(done: int, total: int) -> None:
            if not compressed:
                compressed.append(Compressor(archive, delay=0).run_once())

        report = verify(archive, progress=compress_after_the_listing)
        assert compressed == [1]
        assert report.problems == []
        assert report.volumes == 1 and report.records >= 2 * len(files)  # records of the old file and the new one
