"""The volume dictionary and the COMPACT record layout: upgrade path, damage, compaction, codestreams.

Real files throughout: ``tests/data/layout1.dcbs`` was written by dcbnode before the dictionary existed
(JSON metadata layout, whole HTJ2K codestreams), and must keep reading identically; new volumes are
written, damaged, compacted and decoded by pydicom (pylibjpeg), GDCM and imagecodecs.
"""

from __future__ import annotations

import shutil
import warnings
from io import BytesIO
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from faithful import element_differences, pixels_equal, read
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, generate_uid
from test_archive import _ct_copy
from test_roundtrip import gdcm_pixels

from dcbnode import dcbs
from dcbnode.archive import Archive, volume_path_for
from dcbnode.archive.compaction import compact_volume
from dcbnode.archive.verification import verify
from dcbnode.dcbs.format import FILE_HEADER_SIZE, RECORD_HEADER_SIZE, MetaLayout
from dcbnode.dcbs.record import Codec

LAYOUT1 = Path(__file__).parent / "data" / "layout1.dcbs"
#: what tests/data/layout1.dcbs holds, in record order (MR_small_RLE is deleted by the last record)
LAYOUT1_FILES = [
    "CT_small.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb.dcm",
    "emri_small.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "rtdose_1frame.dcm",
]
LAYOUT1_LIVE = [name for name in LAYOUT1_FILES if name != "MR_small_RLE.dcm"]


def _assert_rebuilds(stored: dcbs.StoredInstance, original: Path) -> None:
    """Every output syntax of ``stored`` has the original's elements and pixels."""
    reference = read(original)
    for syntax in dcbs.available_syntaxes(stored.meta):
        rebuilt = read(dcbs.rebuild(stored.meta, stored.blobs, stored.frame, syntax).part10())
        assert element_differences(reference, rebuilt) == [], (original.name, syntax)
        assert pixels_equal(reference, rebuilt), (original.name, syntax)


def _live_by_name(volume: dcbs.Volume) -> dict[str, dcbs.StoredInstance]:
    live = dcbs.live_instances(volume)
    names = {
        str(pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).SOPInstanceUID): name
        for name in LAYOUT1_FILES
    }
    return {names[uid]: stored for uid, stored in live.items()}


def test_volume_of_the_json_layout_reads_identically(tmp_path: Path) -> None:
    """A volume written before the dictionary existed: every live instance rebuilds exactly."""
    with dcbs.Volume.open(LAYOUT1) as volume:
        kinds = [entry.header.kind.name for entry in volume.records()]
        assert kinds == ["INSTANCE"] * 6 + ["TOMBSTONE"]
        assert {entry.header.layout for entry in volume.records()} == {MetaLayout.JSON}
        live = _live_by_name(volume)
        assert list(live) == LAYOUT1_LIVE
        assert [frame.codec for frame in live["CT_small.dcm"].meta.frames] == [Codec.HTJ2K]
        for name, stored in live.items():
            _assert_rebuilds(stored, Path(get_testdata_file(name)))


def test_append_to_a_volume_of_the_json_layout(tmp_path: Path) -> None:
    """New records after old ones: the dictionary is written once, after them; old and new all read."""
    path = tmp_path / "upgraded.dcbs"
    shutil.copyfile(LAYOUT1, path)
    added = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for target in added:
        target.write_bytes(_ct_copy())
    with dcbs.Volume.open(path, writable=True) as volume:
        for source in added:
            dcbs.append_instance(volume, dcbs.encode_instance(source))
    with dcbs.Volume.open(path) as volume:
        entries = list(volume.records())
        assert [entry.header.kind.name for entry in entries[7:]] == ["DICTIONARY", "INSTANCE", "INSTANCE"]
        assert [entry.header.layout for entry in entries[8:]] == [MetaLayout.COMPACT] * 2
        assert {entry.header.dictionary_id for entry in entries[8:]} == {entries[7].header.meta_crc}
        live = list(dcbs.live_instances(volume).values())
        assert len(live) == 7
        for stored, name in zip(live[:5], LAYOUT1_LIVE, strict=True):
            _assert_rebuilds(stored, Path(get_testdata_file(name)))
        for stored, source in zip(live[5:], added, strict=True):
            assert [frame.codec for frame in stored.meta.frames] == [Codec.HTJ2K_SHARED]
            _assert_rebuilds(stored, source)


@pytest.fixture
def ct_volume(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A new volume of three CT_small copies (one series)."""
    series = generate_uid()
    sources = []
    for index in range(3):
        source = tmp_path / f"ct{index}.dcm"
        source.write_bytes(_ct_copy(series))
        sources.append(source)
    path = tmp_path / "ct.dcbs"
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        for source in sources:
            dcbs.append_instance(volume, dcbs.encode_instance(source))
    return path, sources


def test_new_volume_starts_with_its_dictionary(ct_volume: tuple[Path, list[Path]]) -> None:
    """One dictionary, first; every instance record names it and stores its frame without the main header."""
    path, sources = ct_volume
    with dcbs.Volume.open(path) as volume:
        dictionary, *instances = list(volume.records())
        assert dictionary.header.kind == dcbs.RecordKind.DICTIONARY
        assert dictionary.location.offset == FILE_HEADER_SIZE
        assert dictionary.header.payload_length == dictionary.header.meta_length  # no frame data
        for entry in instances:
            assert entry.header.layout == MetaLayout.COMPACT
            assert entry.header.dictionary_id == dictionary.header.meta_crc
            assert entry.header.meta_length < 200  # vs ≈3.2 KB in the JSON layout
        for stored, source in zip(dcbs.live_instances(volume).values(), sources, strict=True):
            assert [frame.codec for frame in stored.meta.frames] == [Codec.HTJ2K_SHARED]
            _assert_rebuilds(stored, source)


def test_shared_header_codestream_decodes_everywhere(ct_volume: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """The HTJ2K output spliced from an ``htj2k-shared`` frame is the encoder's codestream, byte for byte,
    and pydicom (pylibjpeg), GDCM and imagecodecs all decode it to the stored pixels."""
    path, sources = ct_volume
    reference = pydicom.dcmread(sources[1]).pixel_array
    with dcbs.Volume.open(path) as volume:
        stored = list(dcbs.live_instances(volume).values())[1]
        encoded = dcbs.encode_instance(sources[1])
        assert stored.frame(0) == encoded.frames[0]
        assert stored.meta.frames[0].length < len(encoded.frames[0]) - 100
        codestream = stored.frame(0)
        output = tmp_path / "htj2k.dcm"
        output.write_bytes(dcbs.rebuild(stored.meta, stored.blobs, stored.frame, HTJ2KLossless).part10())
    assert np.array_equal(pydicom.dcmread(output).pixel_array, reference)
    pixels, _ = gdcm_pixels(output)
    assert np.array_equal(pixels, reference)
    assert np.array_equal(imagecodecs.htj2k_decode(codestream), reference)


def test_flipped_byte_in_the_dictionary_is_reported(ct_volume: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Damage in the dictionary record: every read of a record that needs it raises, naming the
    dictionary record, and so does opening a streaming reader (``verify``: the compaction test)."""
    path, _ = ct_volume
    with dcbs.Volume.open(path) as volume:
        dictionary, first, *_ = list(volume.records())
    for position in (
        RECORD_HEADER_SIZE,
        RECORD_HEADER_SIZE + dictionary.header.meta_length // 2,
        dictionary.location.length - 1,
    ):
        damaged = bytearray(path.read_bytes())
        damaged[FILE_HEADER_SIZE + position] ^= 0x01
        copy = tmp_path / "damaged.dcbs"
        copy.write_bytes(damaged)
        with dcbs.Volume.open(copy) as volume:
            with pytest.raises(dcbs.CorruptRecordError) as caught:
                dcbs.StoredInstance.read(volume, first.location.offset)
            assert caught.value.offset == FILE_HEADER_SIZE
            assert "checksum" in caught.value.reason
        with pytest.raises(dcbs.CorruptRecordError), dcbs.DcbStreamingReader(copy):
            pass


def test_missing_dictionary_is_reported(ct_volume: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A COMPACT record copied without its dictionary cannot be read, and says why."""
    path, _ = ct_volume
    data = path.read_bytes()
    with dcbs.Volume.open(path) as volume:
        _, first, *_ = list(volume.records())
    orphan = tmp_path / "orphan.dcbs"
    orphan.write_bytes(
        data[:FILE_HEADER_SIZE] + data[first.location.offset : first.location.offset + first.location.length]
    )
    with dcbs.Volume.open(orphan) as volume, pytest.raises(dcbs.CorruptRecordError) as caught:
        dcbs.live_instances(volume)
    assert caught.value.offset == FILE_HEADER_SIZE
    assert "not found" in caught.value.reason


def test_compaction_carries_the_dictionary(tmp_path: Path) -> None:
    """Compacting a volume whose first instances are deleted keeps the dictionary, first, and every
    remaining instance exports bit-exact; ``verify`` finds nothing wrong, then reports a damaged dictionary."""
    archive = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    try:
        series = generate_uid()
        sources = [_ct_copy(series) for _ in range(4)]
        uids = [archive.store(source).sop_instance_uid for source in sources]
        for uid in uids[:2]:  # the instance whose metadata became the dictionary goes first
            assert archive.delete_instance(uid)
        path = archive.volume_file(volume_path_for(series))
        result = compact_volume(archive, path)
        assert result is not None and result.live_records == 2
        new_path = archive.data_dir / result.new_volume
        with dcbs.Volume.open(new_path) as volume:
            kinds = [entry.header.kind.name for entry in volume.records()]
            assert kinds == ["DICTIONARY", "INSTANCE", "INSTANCE"]
        for uid, source in zip(uids[2:], sources[2:], strict=True):
            with archive.open_instance(uid) as stored:
                assert stored.location.offset > FILE_HEADER_SIZE
                rebuilt = dcbs.rebuild(stored.meta, stored.blobs, stored.frame, ExplicitVRLittleEndian).part10()
                assert element_differences(read(source), read(rebuilt)) == []
                assert pixels_equal(read(source), read(rebuilt))
        report = verify(archive)
        assert report.problems == [], report.problems
        damaged = bytearray(new_path.read_bytes())
        damaged[FILE_HEADER_SIZE + RECORD_HEADER_SIZE + 5] ^= 0x01  # inside the dictionary's metadata
        new_path.write_bytes(damaged)
        problems = verify(archive).problems
        assert any(f"offset {FILE_HEADER_SIZE}: record metadata checksum mismatch" in p for p in problems), problems
    finally:
        archive.close()


def test_compaction_drops_a_deleted_instance_from_the_dictionary(tmp_path: Path) -> None:
    """The dictionary is made from a volume's first instance.  Once that instance is deleted, compaction
    makes the dictionary anew from the first live one and recompresses the records' metadata with it: the
    deleted instance's header (patient data) must not survive.  Later appends use the new dictionary."""
    from dcbnode.dcbs.dictionary import read_dictionary

    archive = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    try:
        series = generate_uid()
        sources = [_ct_copy(series) for _ in range(3)]
        uids = [archive.store(source).sop_instance_uid for source in sources]
        path = archive.volume_file(volume_path_for(series))
        with dcbs.Volume.open(path) as volume:
            assert uids[0].encode() in read_dictionary(volume, FILE_HEADER_SIZE).content
        assert archive.delete_instance(uids[0])
        result = compact_volume(archive, path)
        assert result is not None
        new_path = archive.data_dir / result.new_volume
        with dcbs.Volume.open(new_path) as volume:
            dictionary = read_dictionary(volume, FILE_HEADER_SIZE)
            assert uids[0].encode() not in dictionary.content
            assert uids[1].encode() in dictionary.content
            layouts = [(e.header.layout, e.header.dictionary_id) for e in volume.records()][1:]
            assert layouts == [(MetaLayout.COMPACT, dictionary.id)] * 2
        later = _ct_copy(series)
        uids.append(archive.store(later).sop_instance_uid)
        for uid, source in zip(uids[1:], [*sources[1:], later], strict=True):
            with archive.open_instance(uid) as stored:
                rebuilt = dcbs.rebuild(stored.meta, stored.blobs, stored.frame, HTJ2KLossless).part10()
                assert element_differences(read(source), read(rebuilt)) == []
                assert pixels_equal(read(source), read(rebuilt))
        assert verify(archive).problems == []
    finally:
        archive.close()


def _odd_identity(variant: str) -> bytes:
    """CT_small with unusual identity values, as Part-10 bytes."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if variant == "no instance number":
        del dataset.InstanceNumber
    elif variant == "instance number 2.0":
        dataset["InstanceNumber"].value = "2.0"
    elif variant == "padded instance number":
        dataset["InstanceNumber"].value = " 12 "
    elif variant == "two position values":
        dataset["ImagePositionPatient"].value = ["1.5", "2.5"]
    elif variant == "negative zero position":
        dataset["ImagePositionPatient"].value = ["0", "0", "-0.0"]
    elif variant == "exponent position":
        dataset["ImagePositionPatient"].value = ["0", "0", "1.25E2"]
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "variant",
    [
        "no instance number",
        "instance number 2.0",
        "padded instance number",
        "two position values",
        "negative zero position",
        "exponent position",
    ],
)
def test_identity_fields_come_back_as_encoded(tmp_path: Path, variant: str) -> None:
    """Whether a COMPACT record keeps SOP Instance UID, instance number and slice position in its JSON
    or reads them back from the header, they equal what encoding found (type and sign included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd values it is asked to write
        encoded = dcbs.encode_instance(_odd_identity(variant))
    path = tmp_path / "odd.dcbs"
    with dcbs.Volume.open(path, writable=True, create=True) as volume:
        dcbs.append_instance(volume, encoded)
        dcbs.append_instance(volume, encoded)  # the second record is compressed against the first
    with dcbs.Volume.open(path) as volume:
        (stored,) = dcbs.live_instances(volume).values()
    for field in ("sop_instance_uid", "instance_number", "slice_position"):
        assert repr(getattr(stored.meta, field)) == repr(getattr(encoded.meta, field)), field
