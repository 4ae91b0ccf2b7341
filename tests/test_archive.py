"""The archive (volumes + index) without any network: ingest, compaction races, recovery."""

from __future__ import annotations

import os
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from faithful import element_differences, pixels_equal, read
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dcbnode.archive import Archive, volume_path_for
from dcbnode.archive.compaction import compact_volume
from dcbnode.archive.recovery import recover, reindex
from dcbnode.archive.verification import verify
from dcbnode.dcbs import RecordKind, Volume, VolumeReplacedError, append_instance, encode_instance, rebuild


def _ct_copy(series_uid: str | None = None) -> bytes:
    """CT_small with a new SOP Instance UID (and optionally a given series)."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if series_uid:
        dataset.SeriesInstanceUID = series_uid
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def archive(tmp_path: Path):
    archive = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    yield archive
    archive.close()


def _retrieve(archive: Archive, sop_instance_uid: str) -> bytes:
    with archive.open_instance(sop_instance_uid) as stored:
        return rebuild(stored.meta, stored.blobs, stored.frame, "1.2.840.10008.1.2.1").part10()


def test_append_to_an_unlinked_volume_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.dcbs"
    with Volume.open(path, writable=True, create=True) as volume:
        os.unlink(path)
        with pytest.raises(VolumeReplacedError):
            append_instance(volume, encode_instance(_ct_copy()))


def test_store_reopens_a_volume_replaced_under_the_pool(archive: Archive, tmp_path: Path) -> None:
    series = generate_uid()
    first = _ct_copy(series)
    archive.store(first, defer_compression=True)
    # Another process (dcbnode-admin compact) compresses the volume: it moves the index to the next
    # generation and unlinks the file this archive's pool still holds open.
    other = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    try:
        assert compact_volume(other, archive.volume_file(volume_path_for(series))) is not None
    finally:
        other.close()
    second = _ct_copy(series)
    result = archive.store(second)
    assert not archive.volume_file(volume_path_for(series)).exists()  # not created again beside g2
    (volume,) = (tmp_path / "data" / "volumes").rglob("*.dcbs")
    assert ".g2." in volume.name
    for data in (first, second):
        original, rebuilt = read(data), read(_retrieve(archive, read(data).SOPInstanceUID))
        assert element_differences(original, rebuilt) == []
        assert pixels_equal(original, rebuilt)
    assert result.outcome.value == "stored"


def test_recovery_indexes_a_record_that_never_reached_the_index(archive: Archive, tmp_path: Path) -> None:
    data = _ct_copy()
    encoded = encode_instance(data)
    relative = volume_path_for(encoded.meta.series_instance_uid)
    # A crash between the fsync of the record and the index commit: the record is in the volume only.
    with Volume.open(archive.volume_file(relative), writable=True, create=True) as volume:
        append_instance(volume, encoded)
    with pytest.raises(KeyError):
        _retrieve(archive, encoded.meta.sop_instance_uid)
    report = recover(archive)
    assert report.instances_indexed == 1
    assert element_differences(read(data), read(_retrieve(archive, encoded.meta.sop_instance_uid))) == []
    assert recover(archive).instances_indexed == 0  # nothing left beyond indexed_end


def test_failed_index_commit_leaves_nothing_in_the_volume(archive: Archive) -> None:
    data = _ct_copy()
    encoded = encode_instance(data)
    path = archive.volume_file(volume_path_for(encoded.meta.series_instance_uid))

    def failing_commit(_location: object) -> None:
        raise RuntimeError("index unavailable")

    with Volume.open(path, writable=True, create=True) as volume:
        with pytest.raises(RuntimeError):
            append_instance(volume, encoded, failing_commit)
        # The volume's dictionary, written and synced before the first instance record, stays for the
        # next append; the instance record is gone.
        (dictionary,) = volume.records()
        assert dictionary.header.kind == RecordKind.DICTIONARY
        assert volume.size() == dictionary.location.offset + dictionary.location.length


@pytest.mark.parametrize("policy, outcome", [("keep_first", "duplicate ignored"), ("replace", "replaced")])
def test_duplicate_policies(tmp_path: Path, policy: str, outcome: str) -> None:
    archive = Archive(tmp_path / "d", f"sqlite:///{tmp_path / 'd' / 'index.sqlite'}", duplicate_policy=policy)
    data = _ct_copy()
    assert archive.store(data).outcome.value == "stored"
    assert archive.store(data).outcome.value == outcome
    assert element_differences(read(data), read(_retrieve(archive, read(data).SOPInstanceUID))) == []
    archive.close()


def test_concurrent_stores_encode_htj2k_in_parallel(archive: Archive) -> None:
    """8 threads storing at once (as 8 associations do): every frame is HTJ2K and comes back bit-exact.

    A thread-safety problem in the codec would show up as a frame kept as zstd (the safe fallback).
    """
    series = [generate_uid() for _ in range(4)]
    datas = [_ct_copy(series[index % 4]) for index in range(48)]
    results: list[str] = []
    errors: list[BaseException] = []

    def store(chunk: list[bytes]) -> None:
        try:
            results.extend(archive.store(data).sop_instance_uid for data in chunk)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(datas[index::8],)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 48
    for data in datas:
        original = read(data)
        with archive.open_instance(original.SOPInstanceUID) as stored:
            # HTJ2K, stored without the main header the volume dictionary holds
            assert [frame.codec for frame in stored.meta.frames] == ["htj2k-shared"]
        assert pixels_equal(original, read(_retrieve(archive, original.SOPInstanceUID)))


def test_reindex_after_a_series_was_emptied_and_refilled(archive: Archive) -> None:
    """A volume holding A, B, tombstones of both, then C of the same series: reindex finds exactly C
    (it indexes a volume's live records; recovery, record by record, once reused a deleted series key)."""
    series = generate_uid()
    first, second, third = (_ct_copy(series) for _ in range(3))
    archive.store(first)
    archive.store(second)
    assert archive.delete_instance(read(first).SOPInstanceUID)
    assert archive.delete_instance(read(second).SOPInstanceUID)
    archive.store(third)
    report = reindex(archive)
    assert report.problems == []
    assert (report.instances_indexed, report.instances_removed) == (1, 0)
    assert element_differences(read(third), read(_retrieve(archive, read(third).SOPInstanceUID))) == []
    for gone in (first, second):
        with pytest.raises(KeyError):
            _retrieve(archive, read(gone).SOPInstanceUID)


def test_stores_after_compaction_go_into_the_new_generation(archive: Archive) -> None:
    """One file per series: compaction turns ``<hash>.dcbs`` into ``<hash>.g2.dcbs``, and later stores,
    deletes and compactions follow it instead of starting a new first generation beside it."""
    from dcbnode.archive.compaction import compact_volume

    series = generate_uid()
    first, doomed = _ct_copy(series), _ct_copy(series)
    for data in (first, doomed):
        archive.store(data)
    archive.delete_instance(read(doomed).SOPInstanceUID)
    first_generation = archive.volume_file(volume_path_for(series))
    assert compact_volume(archive, first_generation) is not None
    directory = first_generation.parent
    assert sorted(p.name for p in directory.iterdir()) == [first_generation.name.replace(".dcbs", ".g2.dcbs")]

    later = _ct_copy(series)
    archive.store(later)
    archive.delete_instance(read(first).SOPInstanceUID)
    assert sorted(p.name for p in directory.iterdir()) == [first_generation.name.replace(".dcbs", ".g2.dcbs")]
    assert compact_volume(archive, directory / first_generation.name.replace(".dcbs", ".g2.dcbs")) is not None
    assert sorted(p.name for p in directory.iterdir()) == [first_generation.name.replace(".dcbs", ".g3.dcbs")]

    assert recover(archive).instances_indexed == 0
    rebuilt = read(_retrieve(archive, read(later).SOPInstanceUID))
    assert element_differences(read(later), rebuilt) == []
    assert pixels_equal(read(later), rebuilt)
    with pytest.raises(KeyError):
        _retrieve(archive, read(first).SOPInstanceUID)


def test_a_study_moved_to_another_patient_leaves_no_empty_patient(archive: Archive) -> None:
    """A corrected Patient ID arrives with later instances of a study: the study moves to the new
    patient, and the old patient row, now without studies, goes (else PATIENT-level C-FIND lists it)."""
    from sqlalchemy import select

    from dcbnode.index.models import Patient

    def copy(patient_id: str) -> bytes:
        dataset = read(_ct_copy())
        dataset.PatientID = patient_id
        dataset.StudyInstanceUID = study
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    study = generate_uid()
    archive.store(copy("WRONG-ID"))
    archive.store(copy("RIGHT-ID"))
    with archive.index.session() as session:
        assert session.scalars(select(Patient.patient_id)).all() == ["RIGHT-ID"]


def test_replacing_into_another_series_survives_recovery_and_reindex(tmp_path: Path) -> None:
    """Under "replace", a copy of an instance filed under another series replaces the first copy, whose
    volume gets a tombstone.  That tombstone must delete only the copy in its own volume: recovery after a
    restart, and a reindex, keep the new copy."""
    archive = Archive(tmp_path / "d", f"sqlite:///{tmp_path / 'd' / 'index.sqlite'}", duplicate_policy="replace")
    first = _ct_copy(generate_uid())
    moved = read(first)
    moved.SeriesInstanceUID = generate_uid()
    buffer = BytesIO()
    moved.save_as(buffer, enforce_file_format=True)
    archive.store(first)
    assert archive.store(buffer.getvalue()).outcome.value == "replaced"
    archive.close()

    for rebuild_index in (recover, reindex):
        archive = Archive(tmp_path / "d", f"sqlite:///{tmp_path / 'd' / 'index.sqlite'}", duplicate_policy="replace")
        rebuild_index(archive)
        rebuilt = read(_retrieve(archive, moved.SOPInstanceUID))
        assert rebuilt.SeriesInstanceUID == moved.SeriesInstanceUID, rebuild_index.__name__
        archive.close()


def _with_patient_name(data: bytes, name: str, series_uid: str | None = None) -> bytes:
    dataset = read(data)
    dataset.PatientName = name
    if series_uid:
        dataset.SeriesInstanceUID = series_uid
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_recovery_cuts_an_unacknowledged_duplicate(archive: Archive) -> None:
    """keep_first: a second copy reached the volume, the store found the instance archived and was
    cutting the record back when the process died.  Recovery keeps the archived (acknowledged) copy and
    cuts the duplicate off, so neither a later reindex nor compaction can prefer it."""
    first = _ct_copy()
    archive.store(first)
    path = archive.volume_file(volume_path_for(read(first).SeriesInstanceUID))
    size = path.stat().st_size
    with Volume.open(path, writable=True) as volume:  # the crash: durable, never indexed, never cut
        append_instance(volume, encode_instance(_with_patient_name(first, "SOMEONE^ELSE")))
    report = recover(archive)
    assert (report.instances_indexed, report.problems) == (0, [])
    assert report.duplicates_cut > 0 and path.stat().st_size == size
    assert str(read(_retrieve(archive, read(first).SOPInstanceUID)).PatientName) == str(read(first).PatientName)
    reindex(archive)
    assert str(read(_retrieve(archive, read(first).SOPInstanceUID)).PatientName) == str(read(first).PatientName)


def test_recovery_finishes_a_replacement_into_another_series(tmp_path: Path) -> None:
    """replace: the new copy, filed under another series, reached its volume but the process died before
    the index commit and the old copy's tombstone.  Recovery indexes the new copy and writes the
    tombstone, so a reindex afterwards finds the instance in one place only."""
    archive = Archive(tmp_path / "d", f"sqlite:///{tmp_path / 'd' / 'index.sqlite'}", duplicate_policy="replace")
    first = _ct_copy()
    archive.store(first)
    replacement = _with_patient_name(first, "CORRECTED^NAME", series_uid=generate_uid())
    encoded = encode_instance(replacement)
    new_volume = archive.volume_file(volume_path_for(encoded.meta.series_instance_uid))
    with Volume.open(new_volume, writable=True, create=True) as volume:  # the crash
        append_instance(volume, encoded)
    report = recover(archive)
    assert report.problems == [] and report.instances_indexed == 1
    for rebuild_index in (lambda a: None, reindex):
        rebuild_index(archive)
        rebuilt = read(_retrieve(archive, encoded.meta.sop_instance_uid))
        assert str(rebuilt.PatientName) == "CORRECTED^NAME"
    assert reindex(archive).problems == []  # not live in two volumes
    archive.close()


def test_compaction_drops_a_copy_replaced_from_another_series(tmp_path: Path) -> None:
    """replace: the process died between the new copy's index commit (in another series' volume) and the
    tombstone for the old copy.  The index is right; compaction of the old volume drops the stale copy
    instead of refusing, and a reindex afterwards finds the instance in one place."""
    from dcbnode.archive.compaction import compact_volume
    from dcbnode.archive.verification import verify

    archive = Archive(tmp_path / "d", f"sqlite:///{tmp_path / 'd' / 'index.sqlite'}", duplicate_policy="replace")
    first = _ct_copy(generate_uid())
    kept = _ct_copy(read(first).SeriesInstanceUID)
    archive.store(first)
    archive.store(kept)
    archive.tombstone = lambda *_: None  # the crash: the old copy's tombstone is never written
    replacement = _with_patient_name(first, "CORRECTED^NAME", series_uid=generate_uid())
    assert archive.store(replacement).outcome.value == "replaced"
    del archive.tombstone
    problems = verify(archive).problems
    assert len(problems) == 1 and "stale copy" in problems[0] and "compact" in problems[0], problems
    old_volume = archive.volume_file(volume_path_for(read(first).SeriesInstanceUID))
    result = compact_volume(archive, old_volume)
    assert result is not None and result.live_records == 1
    assert verify(archive).problems == []
    report = reindex(archive)
    assert report.problems == []
    assert str(read(_retrieve(archive, read(first).SOPInstanceUID)).PatientName) == "CORRECTED^NAME"
    assert element_differences(read(kept), read(_retrieve(archive, read(kept).SOPInstanceUID))) == []
    archive.close()


def _left_behind(archive: Archive, data: bytes) -> None:
    """What a writer that died between its record's fsync and its index commit leaves: the record only
    (another process: its own handle on the volume file)."""
    encoded = encode_instance(data)
    with Volume.open(archive.volume_file(volume_path_for(encoded.meta.series_instance_uid)), writable=True,
                     create=True) as volume:
        append_instance(volume, encoded)


def test_a_record_left_by_a_dead_writer_is_indexed_by_the_next_store_into_its_series(archive: Archive) -> None:
    """Another worker killed mid-store left a record without its index row; the next store into the
    series (here, from this process) indexes it, as recovery would have, so that indexed_end never
    passes an unindexed record: the volume verifies clean and can be compacted."""
    series = generate_uid()
    first, orphan, after = _ct_copy(series), _ct_copy(series), _ct_copy(series)
    archive.store(first, defer_compression=True)
    _left_behind(archive, orphan)
    archive.store(after, defer_compression=True)
    for data in (first, orphan, after):
        assert element_differences(read(data), read(_retrieve(archive, read(data).SOPInstanceUID))) == []
    assert verify(archive).problems == []
    assert recover(archive).instances_indexed == 0
    assert compact_volume(archive, archive.volume_file(volume_path_for(series))) is not None
    for data in (first, orphan, after):
        assert element_differences(read(data), read(_retrieve(archive, read(data).SOPInstanceUID))) == []


def test_a_left_behind_duplicate_is_not_indexed_over_the_archived_copy(archive: Archive) -> None:
    """The dead writer's store was a re-send, with other bytes, of an archived instance: the archived copy
    stays what is served."""
    series = generate_uid()
    first = _ct_copy(series)
    archive.store(first, defer_compression=True)
    _left_behind(archive, _with_patient_name(first, "OTHER^BYTES", series))
    archive.store(_ct_copy(series), defer_compression=True)
    assert element_differences(read(first), read(_retrieve(archive, read(first).SOPInstanceUID))) == []


def test_a_left_behind_duplicate_stays_unserved_after_a_reindex(archive: Archive) -> None:
    """reindex takes the last record of an instance in a volume: the archived copy must be the last one
    again once a dead writer's duplicate (other bytes) has been found behind it."""
    series = generate_uid()
    first = _ct_copy(series)
    archive.store(first, defer_compression=True)
    _left_behind(archive, _with_patient_name(first, "OTHER^BYTES", series))
    archive.store(_ct_copy(series), defer_compression=True)
    reindex(archive)
    assert element_differences(read(first), read(_retrieve(archive, read(first).SOPInstanceUID))) == []
    assert verify(archive).problems == []
    assert compact_volume(archive, archive.volume_file(volume_path_for(series))) is not None
    assert element_differences(read(first), read(_retrieve(archive, read(first).SOPInstanceUID))) == []


def test_recovery_puts_the_archived_copy_after_an_unacknowledged_duplicate(archive: Archive) -> None:
    """A crash left an unacknowledged duplicate (other bytes) that a later record, indexed by recovery,
    follows: it cannot be cut off the end; the archived record is copied after it, so that reindex and
    compaction keep serving the archived copy."""
    series = generate_uid()
    first = _ct_copy(series)
    archive.store(first, defer_compression=True)
    _left_behind(archive, _with_patient_name(first, "OTHER^BYTES", series))
    later = _ct_copy(series)
    _left_behind(archive, later)
    report = recover(archive)
    assert report.instances_indexed == 1 and report.problems  # the duplicate is reported
    reindex(archive)
    for data in (first, later):
        assert element_differences(read(data), read(_retrieve(archive, read(data).SOPInstanceUID))) == []
    assert compact_volume(archive, archive.volume_file(volume_path_for(series))) is not None
    assert element_differences(read(first), read(_retrieve(archive, read(first).SOPInstanceUID))) == []
