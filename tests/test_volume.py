"""DCBS volumes on disk: appends across processes, torn tails, damaged bytes, foreign files, the live set.

Everything runs on real files and real processes: appends are made by separate ``python -c`` interpreters
(one after the other, two at once, and one killed with SIGKILL mid-stream), torn tails are made by cutting
a copy of a real volume at every byte offset of its last record, and damage by flipping real bytes.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from faithful import element_differences, pixels_equal, read
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless

from dcbnode import dcbs
from dcbnode.dcbs.format import FILE_HEADER, FILE_HEADER_SIZE, FILE_MAGIC, RECORD_HEADER_SIZE, crc32

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
EMRI_SMALL = Path(str(get_testdata_file("emri_small.dcm", download=False)))
UID_ROOT = "1.2.826.0.1.3680043.10.1443.99"  # test UIDs under dcbnode's root


def ct_bytes(sop_instance_uid: str, *, size: int | None = None, offset: int = 0) -> bytes:
    """CT_small as Part-10 bytes with a new SOPInstanceUID; ``size`` crops it to a ``size``² image
    (a small record), ``offset`` adds to every pixel so versions of one instance differ."""
    ds = pydicom.dcmread(CT_SMALL)
    pixels = ds.pixel_array
    if size is not None:
        pixels = pixels[:size, :size]
        ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels + offset, dtype=pixels.dtype).tobytes()
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_volume(path: Path, sources: list[bytes | Path]) -> list[dcbs.RecordLocation]:
    """Create a volume holding ``sources`` in order; return the record locations."""
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        return [dcbs.append_instance(volume, dcbs.encode_instance(source))[0] for source in sources]


def assert_intact(stored: dcbs.StoredInstance, original: bytes | Path) -> None:
    """Every frame passes its CRC and the instance rebuilds to the original elements and pixels."""
    reference = read(original)
    for syntax in (HTJ2KLossless, ExplicitVRLittleEndian):
        if syntax in dcbs.available_syntaxes(stored.meta):
            rebuilt = read(dcbs.rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10())
            assert element_differences(reference, rebuilt) == []
            assert pixels_equal(reference, rebuilt)


def run_python(script: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (cwd: the repository, no ``dl`` on the path); fail on error."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, check=False, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# -- appends from other processes ------------------------------------------------------------------------------

APPEND_ONE = textwrap.dedent("""
    import os, sys
    from dcbnode import dcbs
    volume_path, source = sys.argv[1:3]
    volume = dcbs.Volume.open(volume_path, writable=True, create=True)
    print(len(dcbs.live_instances(volume)))
    dcbs.append_instance(volume, dcbs.encode_instance(source))
    os._exit(0)  # no close, no interpreter shutdown: what survives is what append made durable
""")


def test_append_across_process_restarts(tmp_path: Path) -> None:
    """Three interpreters append one instance each; each sees the previous ones; all read back intact."""
    volume_path = tmp_path / "restarts.dcbs"
    sources = []
    for index in range(3):
        source = tmp_path / f"in{index}.dcm"
        source.write_bytes(ct_bytes(f"{UID_ROOT}.1.{index}", offset=index))
        sources.append(source)
        seen = run_python(APPEND_ONE, volume_path, source).stdout.strip()
        assert seen == str(index)
    with dcbs.Volume.open(volume_path) as volume:
        live = dcbs.live_instances(volume)
        assert list(live) == [f"{UID_ROOT}.1.{index}" for index in range(3)]
        for stored, source in zip(live.values(), sources, strict=True):
            assert_intact(stored, source)


APPEND_MANY = textwrap.dedent("""
    import io, os, sys, time
    import pydicom
    from pydicom.data import get_testdata_file
    from dcbnode import dcbs
    volume_path, worker, count, go, root = sys.argv[1:6]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    while not os.path.exists(go):  # start together: both create the volume and append at once
        time.sleep(0.001)
    with dcbs.Volume.open(volume_path, writable=True, create=True) as volume:
        for index in range(int(count)):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{root}.{worker}.{index}"
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            dcbs.append_instance(volume, dcbs.encode_instance(buffer.getvalue()))
""")


def test_two_processes_append_concurrently(tmp_path: Path) -> None:
    """Two interpreters create one volume at the same moment and append 20 instances each: all 40 intact."""
    volume_path = tmp_path / "shared.dcbs"
    go = tmp_path / "go"
    root = f"{UID_ROOT}.2"
    command = [sys.executable, "-c", APPEND_MANY, str(volume_path)]
    workers = [subprocess.Popen([*command, str(worker), "20", str(go), root], stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parent.parent) for worker in (1, 2)]
    time.sleep(1.0)  # both interpreters are up and waiting
    go.touch()
    for worker in workers:
        _, stderr = worker.communicate(timeout=180)
        assert worker.returncode == 0, stderr[-3000:]
    expected = {f"{root}.{worker}.{index}" for worker in (1, 2) for index in range(20)}
    reference = pydicom.dcmread(CT_SMALL).pixel_array
    with dcbs.Volume.open(volume_path) as volume:
        records = list(volume.records())
        kinds = [entry.header.kind for entry in records]
        assert kinds == [dcbs.RecordKind.DICTIONARY] + [dcbs.RecordKind.INSTANCE] * 40  # one dictionary, first
        assert FILE_HEADER_SIZE + sum(entry.location.length for entry in records) == volume.size()
        live = dcbs.live_instances(volume)
        assert set(live) == expected
        for uid, stored in live.items():
            rebuilt = read(dcbs.rebuild(stored.meta, stored.blobs, stored.frame, HTJ2KLossless).part10())
            assert rebuilt.SOPInstanceUID == uid
            assert np.array_equal(rebuilt.pixel_array, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "shared.dcbs"]  # no temporary left behind


APPEND_FOREVER = textwrap.dedent("""
    import sys
    from dcbnode import dcbs
    volume_path, source, ready = sys.argv[1:4]
    encoded = dcbs.encode_instance(source)
    with dcbs.Volume.open(volume_path, writable=True, create=True) as volume:
        open(ready, "w").close()
        while True:
            dcbs.append_instance(volume, encoded)
""")


def test_process_killed_while_appending(tmp_path: Path) -> None:
    """SIGKILL in the middle of appends, three times: the volume reopens and every complete record is intact."""
    volume_path = tmp_path / "killed.dcbs"
    source = tmp_path / "emri.dcm"
    source.write_bytes(EMRI_SMALL.read_bytes())
    for attempt in range(3):
        ready = tmp_path / f"ready{attempt}"
        process = subprocess.Popen([sys.executable, "-c", APPEND_FOREVER, str(volume_path), str(source),
                                    str(ready)], cwd=Path(__file__).resolve().parent.parent)
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ready.exists(), "the appending interpreter did not start"
            time.sleep(0.3 + 0.1 * attempt)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        with dcbs.Volume.open(volume_path, writable=True) as volume:
            records = list(volume.records())
            assert records, "nothing was appended before the kill"
            assert records[-1].location.offset + records[-1].location.length == volume.size()
            assert records[0].header.kind == dcbs.RecordKind.DICTIONARY
            for entry in records[1:]:
                assert len(list(dcbs.StoredInstance.read(volume, entry.location.offset).iter_frames())) == 10
            (stored,) = dcbs.live_instances(volume).values()  # one SOP Instance UID: last record wins
            assert_intact(stored, source)


# -- torn tails ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[dcbs.RecordLocation], list[bytes]]:
    """A volume of three small instance records: its bytes, their locations and the source files."""
    sources = [ct_bytes(f"{UID_ROOT}.3.{index}", size=8, offset=index) for index in range(3)]
    path = tmp_path_factory.mktemp("torn") / "three.dcbs"
    locations = build_volume(path, list(sources))
    return path.read_bytes(), locations, sources


def test_volume_cut_at_every_offset_of_its_last_record(
    three_records: tuple[bytes, list[dcbs.RecordLocation], list[bytes]], tmp_path: Path
) -> None:
    """Read-only opens ignore the torn tail; writable opens cut it; the first two records stay intact."""
    data, locations, _ = three_records
    last = locations[-1]
    assert last.offset + last.length == len(data)
    first_two = [f"{UID_ROOT}.3.0", f"{UID_ROOT}.3.1"]
    frame_crcs = None
    path = tmp_path / "cut.dcbs"
    for cut in range(last.offset, len(data)):
        path.write_bytes(data[:cut])
        with dcbs.Volume.open(path) as volume:
            live = dcbs.live_instances(volume)
            assert list(live) == first_two, cut
            assert volume.size() == cut  # a reader never writes
        with dcbs.Volume.open(path, writable=True) as volume:
            assert volume.size() == last.offset, cut
            live = dcbs.live_instances(volume)
            assert list(live) == first_two, cut
            crcs = [crc32(frame) for stored in live.values() for frame in stored.iter_frames()]
            frame_crcs = frame_crcs or crcs
            assert crcs == frame_crcs, cut
        assert path.read_bytes() == data[: last.offset], cut


def test_append_after_torn_tail(three_records: tuple[bytes, list[dcbs.RecordLocation], list[bytes]],
                                tmp_path: Path) -> None:
    """A writable open cuts the torn tail and the next append lands where the last complete record ended."""
    data, locations, sources = three_records
    path = tmp_path / "torn.dcbs"
    path.write_bytes(data[: locations[-1].offset + locations[-1].length // 2])
    replacement = ct_bytes(f"{UID_ROOT}.3.9", size=8, offset=9)
    with dcbs.Volume.open(path, writable=True) as volume:
        location, _ = dcbs.append_instance(volume, dcbs.encode_instance(replacement))
    assert location.offset == locations[-1].offset
    with dcbs.Volume.open(path) as volume:
        live = dcbs.live_instances(volume)
        assert list(live) == [f"{UID_ROOT}.3.0", f"{UID_ROOT}.3.1", f"{UID_ROOT}.3.9"]
        for stored, source in zip(live.values(), [*sources[:2], replacement], strict=True):
            assert_intact(stored, source)
        assert volume.size() == location.offset + location.length


@pytest.mark.parametrize("zeros", [7, 31, 32, 4096, (1 << 20) + 4097], ids=lambda n: f"{n}-zero-bytes")
def test_zero_filled_tail_is_cut(three_records: tuple[bytes, list[dcbs.RecordLocation], list[bytes]],
                                 tmp_path: Path, zeros: int) -> None:
    """Zeros after the last record (space allocated by a crashed write) are ignored, and cut when writable."""
    data, _, _ = three_records
    path = tmp_path / "zeros.dcbs"
    path.write_bytes(data + b"\0" * zeros)
    with dcbs.Volume.open(path) as volume:
        assert len(dcbs.live_instances(volume)) == 3
    with dcbs.Volume.open(path, writable=True) as volume:
        assert volume.size() == len(data)
        assert len(dcbs.live_instances(volume)) == 3
    assert path.read_bytes() == data


@pytest.mark.parametrize("tail", [
    pytest.param(bytes(range(1, 101)), id="non-zero"),
    pytest.param(b"\0" * 4096 + b"\x01" + b"\0" * 100, id="zeros-then-one-byte"),
    pytest.param(b"DCBR" + b"\xab" * 60, id="record-magic-bad-header"),
])
def test_garbage_after_last_record_raises(three_records: tuple[bytes, list[dcbs.RecordLocation], list[bytes]],
                                          tmp_path: Path, tail: bytes) -> None:
    """At least a header's worth of non-record bytes after the last record is damage, not a torn tail:
    it raises naming the file and offset, and a writable open leaves the file untouched."""
    data, _, _ = three_records
    path = tmp_path / "garbage.dcbs"
    path.write_bytes(data + tail)
    with dcbs.Volume.open(path) as volume, pytest.raises(dcbs.CorruptRecordError) as caught:
        dcbs.live_instances(volume)
    assert (caught.value.path, caught.value.offset) == (str(path), len(data))
    with pytest.raises(dcbs.CorruptRecordError) as caught:
        dcbs.Volume.open(path, writable=True)
    assert caught.value.offset == len(data)
    assert path.read_bytes() == data + tail


def test_short_garbage_counts_as_a_torn_header(three_records: tuple[bytes, list[dcbs.RecordLocation], list[bytes]],
                                               tmp_path: Path) -> None:
    """Fewer bytes than a record header cannot be told from a header cut short, so they are cut (volume.py)."""
    data, _, _ = three_records
    path = tmp_path / "short.dcbs"
    path.write_bytes(data + b"\xff" * (RECORD_HEADER_SIZE - 1))
    with dcbs.Volume.open(path, writable=True) as volume:
        assert volume.size() == len(data)


# -- damaged bytes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damage_volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[dcbs.RecordLocation], list[int]]:
    """Records: CT, a 10-frame MR, CT, a small CT, then a tombstone deleting the small CT.

    Returns the volume's bytes, the five record locations and their metadata lengths.
    """
    path = tmp_path_factory.mktemp("damage") / "damage.dcbs"
    locations = build_volume(path, [ct_bytes(f"{UID_ROOT}.4.0"), EMRI_SMALL, ct_bytes(f"{UID_ROOT}.4.2"),
                                    ct_bytes(f"{UID_ROOT}.4.3", size=8)])
    with dcbs.Volume.open(path, writable=True) as volume:
        location, _ = dcbs.append_tombstone(volume, f"{UID_ROOT}.4.3", "1.2.3")
        locations.append(location)
        meta_lengths = [volume.read_header(location.offset).meta_length for location in locations]
    return path.read_bytes(), locations, meta_lengths


def _positions(location: dcbs.RecordLocation, meta_length: int) -> dict[str, list[int]]:
    """Byte positions (relative to the record) to damage, by region."""
    meta_end = RECORD_HEADER_SIZE + meta_length
    return {
        # magic, kind, payload length, meta length/crc, dictionary id, crc
        "header": [0, 4, 8, 16, 20, 24, 28, 31],
        # the zstd frame of the metadata: its start, early, a third in, the middle, its last byte
        "metadata": [RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 2, RECORD_HEADER_SIZE + meta_length // 3,
                     (RECORD_HEADER_SIZE + meta_end) // 2, meta_end - 1],
        "frames": [meta_end, meta_end + 1, (meta_end + location.length) // 2, location.length - 1],
    }


#: Positions per region in ``_positions``: (record, region, index) for the three image records.
REGION_SIZES = {"header": 8, "metadata": 5, "frames": 4}
CASES = [(record, region, index) for record in (0, 1, 2) for region, size in REGION_SIZES.items()
         for index in range(size)]


@pytest.mark.parametrize(("record", "region", "index"), CASES,
                         ids=[f"record{r}-{g}-{i}" for r, g, i in CASES])
def test_flipped_byte_is_reported_never_served(
    damage_volume: tuple[bytes, list[dcbs.RecordLocation], list[int]], tmp_path: Path,
    record: int, region: str, index: int,
) -> None:
    """A flipped byte raises CorruptRecordError naming file and record offset when that record is read."""
    data, locations, meta_lengths = damage_volume
    location = locations[record]
    position = location.offset + _positions(location, meta_lengths[record])[region][index]
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    path = tmp_path / "flipped.dcbs"
    path.write_bytes(damaged)

    def assert_names_record(error: dcbs.CorruptRecordError) -> None:
        assert (error.path, error.offset) == (str(path), location.offset)
        assert str(path) in str(error) and f"offset {location.offset}" in str(error)

    volume = dcbs.Volume.open(path)
    try:
        if region != "frames":  # header and metadata are checked by every walk of the log
            with pytest.raises(dcbs.CorruptRecordError) as caught:
                dcbs.live_instances(volume)
            assert_names_record(caught.value)
            with pytest.raises(dcbs.CorruptRecordError) as caught:
                dcbs.StoredInstance.read(volume, location.offset)
            assert_names_record(caught.value)
            if region == "header":
                with pytest.raises(dcbs.CorruptRecordError):
                    dcbs.Volume.open(path, writable=True)  # never "repaired" by cutting good records
                assert path.read_bytes() == bytes(damaged)
            return
        live = dcbs.live_instances(volume)  # frames are checked when read, not when listing
        (stored,) = (s for s in live.values() if s.location == location)
        for syntax in dcbs.available_syntaxes(stored.meta):
            with pytest.raises(dcbs.CorruptRecordError) as caught:
                dcbs.rebuild(stored.meta, stored.blobs, stored.frame, syntax)
            assert_names_record(caught.value)
            assert "frame data" in caught.value.reason
    finally:
        volume.close()
    with dcbs.DcbStreamingReader(path) as reader, pytest.raises(dcbs.CorruptRecordError):
        for frame in range(reader.get_frame_count()):
            reader.get_dicom_for_frame(frame)


@pytest.mark.parametrize("position", [0, 8, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 10, -1])
def test_flipped_byte_in_tombstone(damage_volume: tuple[bytes, list[dcbs.RecordLocation], list[int]],
                                   tmp_path: Path, position: int) -> None:
    """A damaged tombstone raises rather than silently keeping (or deleting) an instance."""
    data, locations, _ = damage_volume
    tombstone = locations[-1]
    damaged = bytearray(data)
    damaged[tombstone.offset + position % tombstone.length] ^= 0x55
    path = tmp_path / "tombstone.dcbs"
    path.write_bytes(damaged)
    with dcbs.Volume.open(path) as volume, pytest.raises(dcbs.CorruptRecordError) as caught:
        dcbs.live_instances(volume)
    assert caught.value.offset == tombstone.offset


def test_undamaged_copy_reads_clean(damage_volume: tuple[bytes, list[dcbs.RecordLocation], list[int]],
                                    tmp_path: Path) -> None:
    """Control for the damage tests: the same bytes undamaged read and rebuild without error."""
    data, _, _ = damage_volume
    path = tmp_path / "clean.dcbs"
    path.write_bytes(data)
    with dcbs.Volume.open(path) as volume:
        live = dcbs.live_instances(volume)
        assert list(live) == [f"{UID_ROOT}.4.0", read(EMRI_SMALL).SOPInstanceUID, f"{UID_ROOT}.4.2"]
        assert_intact(live[read(EMRI_SMALL).SOPInstanceUID], EMRI_SMALL)


def test_flipped_file_header_byte(tmp_path: Path) -> None:
    """The 64-byte file header is checksummed too."""
    path = tmp_path / "header.dcbs"
    build_volume(path, [ct_bytes(f"{UID_ROOT}.5.0", size=8)])
    for position in (0, 8, 12, 20, 40, 63):
        damaged = bytearray(path.read_bytes())
        damaged[position] ^= 0x01
        copy = tmp_path / f"header{position}.dcbs"
        copy.write_bytes(damaged)
        with pytest.raises(dcbs.DcbsFormatError, match=re.escape(str(copy))):
            dcbs.Volume.open(copy)


# -- files that are not DCBS volumes ------------------------------------------------------------------------------


def _future_version_header() -> bytes:
    body = FILE_HEADER.pack(FILE_MAGIC, 3, FILE_HEADER_SIZE, 0, b"\x01" * 16, b"\0" * 28, 0)[:-4]
    return body + crc32(body).to_bytes(4, "little")


@pytest.mark.parametrize(("content", "message"), [
    pytest.param(b"", "shorter than a DCBS file header", id="empty"),
    pytest.param(os.urandom(40), "shorter than a DCBS file header", id="short-random"),
    pytest.param(np.random.default_rng(1).bytes(5000), "bad magic", id="random"),
    pytest.param(CT_SMALL.read_bytes(), "bad magic", id="dicom"),
    pytest.param(b"DCMCUBES" + b"\0" * 200, "bad magic", id="dicube-magic"),
    pytest.param(_future_version_header(), "written by a newer dcbnode (DCBS format version 3)", id="future-version"),
])
@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_not_a_dcbs_volume(tmp_path: Path, content: bytes, message: str, writable: bool) -> None:
    """Foreign files raise DcbsFormatError naming the file, and are never modified."""
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    with pytest.raises(dcbs.DcbsFormatError) as caught:
        dcbs.Volume.open(path, writable=writable, create=True)
    assert str(path) in str(caught.value) and message in str(caught.value)
    assert path.read_bytes() == content


def test_missing_volume_without_create(tmp_path: Path) -> None:
    """Opening a path that does not exist (without ``create``) raises and creates nothing."""
    with pytest.raises(dcbs.DcbsFormatError, match="no such volume"):
        dcbs.Volume.open(tmp_path / "absent.dcbs", writable=True)
    assert list(tmp_path.iterdir()) == []


def test_read_only_volume_refuses_appends(tmp_path: Path) -> None:
    """A volume opened read-only never writes."""
    path = tmp_path / "ro.dcbs"
    build_volume(path, [])
    with dcbs.Volume.open(path) as volume, pytest.raises(dcbs.DcbsError, match="read-only"):
        dcbs.append_instance(volume, dcbs.encode_instance(ct_bytes(f"{UID_ROOT}.6.0", size=8)))
    assert path.stat().st_size == FILE_HEADER_SIZE


# -- the live set: last record wins, tombstones ------------------------------------------------------------------


def test_last_record_wins_and_tombstones(tmp_path: Path) -> None:
    """A newer record for a SOP Instance UID replaces the older one; a tombstone deletes; re-adding revives."""
    path = tmp_path / "live.dcbs"
    a1, b1 = ct_bytes(f"{UID_ROOT}.7.1", size=16), ct_bytes(f"{UID_ROOT}.7.2", size=16)
    a2 = ct_bytes(f"{UID_ROOT}.7.1", size=16, offset=5)
    a, b = f"{UID_ROOT}.7.1", f"{UID_ROOT}.7.2"
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        for source in (a1, b1, a2):
            dcbs.append_instance(volume, dcbs.encode_instance(source))
        live = dcbs.live_instances(volume)
        assert list(live) == [b, a]  # in the order last written
        assert_intact(live[a], a2)
        with pytest.raises(AssertionError):
            assert_intact(live[a], a1)  # the older version is not what is served
        dcbs.append_tombstone(volume, b, "1.2.3")
        dcbs.append_tombstone(volume, f"{UID_ROOT}.7.404", "1.2.3")  # unknown UID: no effect
        assert list(dcbs.live_instances(volume)) == [a]
        mark = volume.size()
        location, _ = dcbs.append_instance(volume, dcbs.encode_instance(b1))
        assert location.offset == mark
    with dcbs.Volume.open(path) as volume:
        live = dcbs.live_instances(volume)
        assert list(live) == [a, b]
        assert_intact(live[b], b1)
        assert list(dcbs.live_instances(volume, start=mark)) == [b]  # incremental scan from a boundary
        assert [entry.header.kind.name for entry in volume.records()] == [
            "DICTIONARY", "INSTANCE", "INSTANCE", "INSTANCE", "TOMBSTONE", "TOMBSTONE", "INSTANCE"]


def test_failed_on_durable_leaves_nothing(tmp_path: Path) -> None:
    """When the ``on_durable`` callback raises, the record is cut again and the next append takes its place."""
    path = tmp_path / "durable.dcbs"
    build_volume(path, [ct_bytes(f"{UID_ROOT}.8.0", size=8)])
    size = path.stat().st_size
    seen: list[dcbs.RecordLocation] = []

    def refuse(location: dcbs.RecordLocation) -> None:
        seen.append(location)
        assert path.stat().st_size == location.offset + location.length  # durable before the callback
        raise RuntimeError("index commit failed")

    with dcbs.Volume.open(path, writable=True) as volume:
        with pytest.raises(RuntimeError, match="index commit failed"):
            dcbs.append_instance(volume, dcbs.encode_instance(ct_bytes(f"{UID_ROOT}.8.1", size=8)), refuse)
        assert volume.size() == size
        location, result = dcbs.append_instance(volume, dcbs.encode_instance(ct_bytes(f"{UID_ROOT}.8.2", size=8)),
                                                lambda loc: loc.offset)
        assert location.offset == seen[0].offset == result == size
    with dcbs.Volume.open(path) as volume:
        assert list(dcbs.live_instances(volume)) == [f"{UID_ROOT}.8.0", f"{UID_ROOT}.8.2"]
