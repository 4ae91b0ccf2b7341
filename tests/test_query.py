"""C-FIND matching on the index (no network): a real SQLite index filled through Archive.store.

Instances come from pydicom's test files: CT_small edited into several patients/studies/series, and every
file of ``pydicom/data/charset_files`` (given fresh UIDs, since some share them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import POSTGRES_ENV, _postgres_database
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from sqlalchemy import event

from dcbnode.archive import Archive
from dcbnode.config import QueryConfig
from dcbnode.dcbs.dataset_split import parse_explicit_le
from dcbnode.index.query import QueryError, build_select, parse_identifier, run_query
from dcbnode.index.query import run as query_run

CHARSET_DIR = Path(pydicom.__file__).parent / "data" / "charset_files"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CHARSET_STUDIES = len(list(CHARSET_DIR.glob("*.dcm")))
WEIRD_NAMES = ["'; DROP TABLE patients; --", "100%^Pure", "under_score", "semi;colon", 'quo"te^o\'neil',
               "br[ack]et", "ex!cl"]


def _part10(ds: Dataset) -> bytes:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _ct(patient_id: str, name: str, study: str, series: str, number: int, **attrs: object) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID, ds.PatientName = patient_id, name
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.InstanceNumber = number
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return _part10(ds)


#: study UID -> (patient, name, date, time, accession, [(series UID, modality, instance count)])
STUDIES: dict[str, tuple] = {}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """An archive with CT_small variants and every charset file (SQLite index, then PostgreSQL when
    $DCBNODE_TEST_POSTGRES_URL is set, in a fresh database dropped afterwards)."""
    if request.param == "sqlite":
        root = tmp_path_factory.mktemp("query")
        yield from _filled(root, f"sqlite:///{root / 'index.sqlite'}")
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"set {POSTGRES_ENV} to run the PostgreSQL variant")
    for url in _postgres_database(base):
        yield from _filled(tmp_path_factory.mktemp("query-pg"), url)


def _filled(root: Path, url: str) -> Iterator[Archive]:
    STUDIES.clear()
    archive = Archive(root, url)
    plan = [("P1", "SMITH^JOHN", "20200115", "101500", "ACC1", [("CT", 3), ("MR", 2)]),
            ("P1", "SMITH^JOHN", "20201231", "235959.5", "ACC2", [("CT", 1)]),
            ("P2", "Smithers^Wayland", "20210601", "080000", "ACC3", [("PT", 2)]),
            ("P3", "JONES^BOB", "", "", "ACC4", [("CT", 1)])]
    plan += [(f"W{i}", name, "20190101", "120000", f"W{i}", [("OT", 1)]) for i, name in enumerate(WEIRD_NAMES)]
    for patient, name, date, time, accession, series_plan in plan:
        study = generate_uid()
        STUDIES[study] = (patient, name, date, time, accession, [])
        for modality, count in series_plan:
            series = generate_uid()
            STUDIES[study][5].append((series, modality, count))
            for number in range(count, 0, -1):  # stored out of order: IMAGE answers sort them
                archive.store(_ct(patient, name, study, series, number, StudyDate=date, StudyTime=time,
                                  AccessionNumber=accession, Modality=modality))
    for path in sorted(CHARSET_DIR.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.SOPClassUID = ds.get("SOPClassUID", CT_IMAGE)
        ds.PatientID = ds.get("PatientID") or path.stem
        archive.store(_part10(ds))
    yield archive
    archive.close()


def _header(archive: Archive):
    def read(sop: str) -> Dataset | None:
        with archive.open_instance(sop) as stored:
            return parse_explicit_le(stored.blobs.header)
    return read


def _wire(ds: Dataset) -> Dataset:
    """Encode and decode an identifier as pynetdicom does (text goes through its character set)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return read_dataset(BytesIO(buffer.getvalue()), is_implicit_VR=True, is_little_endian=True)


def find(archive: Archive, level: str, model: str = "STUDY", *, charset: object = None,
         case_insensitive: bool = True, limit: int = 0, **keys: object) -> list[Dataset]:
    """Run a C-FIND identifier through parse_identifier and run_query; responses decoded from the wire."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    query = parse_identifier(_wire(ds), model, QueryConfig(case_insensitive_names=case_insensitive))
    responses = run_query(archive.index, query, retrieve_ae_title="DCBNODE", limit=limit,
                          header_reader=_header(archive))
    return [_wire(response) for response in responses]


def uids(responses: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(keyword)) for r in responses}


def studies_of(patient: str) -> set[str]:
    return {uid for uid, study in STUDIES.items() if study[0] == patient}


# -- levels and hierarchy ------------------------------------------------------------------------------


def test_patient_level_with_counts(archive: Archive) -> None:
    [r] = find(archive, "PATIENT", "PATIENT", PatientID="P1", PatientName="", NumberOfPatientRelatedStudies="",
               NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="", RetrieveAETitle="")
    assert (r.PatientName, r.NumberOfPatientRelatedStudies, r.NumberOfPatientRelatedSeries) == ("SMITH^JOHN", 2, 3)
    assert (r.NumberOfPatientRelatedInstances, r.QueryRetrieveLevel, r.RetrieveAETitle) == (6, "PATIENT", "DCBNODE")


def test_study_level_both_models(archive: Archive) -> None:
    for model in ("PATIENT", "STUDY"):
        found = find(archive, "STUDY", model, PatientID="P1", StudyInstanceUID="", StudyDate="",
                     ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                     SOPClassesInStudy="")
        assert uids(found) == studies_of("P1")
        first = next(r for r in found if r.StudyDate == "20200115")
        assert list(first.ModalitiesInStudy) == ["CT", "MR"]
        assert (first.NumberOfStudyRelatedSeries, first.NumberOfStudyRelatedInstances) == (2, 5)
        assert first.SOPClassesInStudy == CT_IMAGE


def test_series_level_one_response_per_series(archive: Archive) -> None:
    study = next(uid for uid, s in STUDIES.items() if s[2] == "20200115")
    found = find(archive, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="", Modality="",
                 NumberOfSeriesRelatedInstances="", SliceThickness="", Manufacturer="")
    assert len(found) == 2
    assert {(r.Modality, r.NumberOfSeriesRelatedInstances) for r in found} == {("CT", 3), ("MR", 2)}
    assert all(r.SliceThickness == 5 and r.Manufacturer == "GE MEDICAL SYSTEMS" for r in found)  # from header
    assert len(find(archive, "SERIES", StudyInstanceUID=study, Modality="MR")) == 1


def test_image_level_sorted_with_header_keys(archive: Archive) -> None:
    study = next(uid for uid, s in STUDIES.items() if s[2] == "20200115")
    series = STUDIES[study][5][0][0]
    found = find(archive, "IMAGE", "PATIENT", PatientID="P1", StudyInstanceUID=study, SeriesInstanceUID=series,
                 SOPInstanceUID="", InstanceNumber="", ImagePositionPatient="", PatientAge="")
    assert [r.InstanceNumber for r in found] == [1, 2, 3]
    assert all(len(r.ImagePositionPatient) == 3 and "PatientAge" in r for r in found)
    assert len(find(archive, "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber="2")) == 1


@pytest.mark.parametrize(("level", "model", "keys", "comment"), [
    ("STUDY", "PATIENT", {}, "PatientID missing"),
    ("STUDY", "PATIENT", {"PatientID": "P*"}, "PatientID must be one value"),
    ("SERIES", "STUDY", {}, "StudyInstanceUID missing"),
    ("SERIES", "STUDY", {"StudyInstanceUID": "1.2\\1.3"}, "StudyInstanceUID must be one value"),
    ("IMAGE", "STUDY", {"StudyInstanceUID": "1.2"}, "SeriesInstanceUID missing"),
    ("PATIENT", "STUDY", {}, "Bad QueryRetrieveLevel"),
    ("BOGUS", "PATIENT", {}, "Bad QueryRetrieveLevel"),
    ("STUDY", "STUDY", {"StudyDate": "2020-01-01"}, "Malformed StudyDate"),
    ("STUDY", "STUDY", {"StudyTime": "25x"}, "Malformed StudyTime"),
    ("STUDY", "STUDY", {"SeriesInstanceUID": "1.2.3"}, "below the STUDY level"),
    ("STUDY", "STUDY", {"StudyInstanceUID": "1.2.*"}, "Wildcards are not allowed"),
])
def test_malformed_identifiers_fail_with_comment(archive: Archive, level: str, model: str, keys: dict,
                                                 comment: str) -> None:
    with pytest.raises(QueryError) as caught:
        find(archive, level, model, **keys)
    assert caught.value.status == 0xA900
    assert comment in caught.value.comment


def test_missing_level() -> None:
    with pytest.raises(QueryError, match="QueryRetrieveLevel is missing"):
        parse_identifier(Dataset(), "STUDY")


# -- matching types ------------------------------------------------------------------------------------


def test_single_universal_and_list(archive: Archive) -> None:
    assert uids(find(archive, "STUDY", AccessionNumber="ACC3")) == studies_of("P2")
    assert len(find(archive, "STUDY", AccessionNumber="")) == len(STUDIES) + CHARSET_STUDIES  # all
    some = sorted(studies_of("P1"))
    assert uids(find(archive, "STUDY", StudyInstanceUID="\\".join([*some, "1.2.3.4"]))) == set(some)
    assert find(archive, "STUDY", AccessionNumber="acc3") == []  # SH matching is case-sensitive


def test_date_ranges(archive: Archive) -> None:
    assert uids(find(archive, "STUDY", StudyDate="20200101-20201231")) == studies_of("P1")
    assert uids(find(archive, "STUDY", StudyDate="20210101-")) == studies_of("P2")
    early = uids(find(archive, "STUDY", StudyDate="-20190101"))
    assert {u for u, s in STUDIES.items() if s[0][0] == "W"} <= early
    assert not early & (studies_of("P1") | studies_of("P2") | studies_of("P3"))  # P3 has no date: no match
    assert uids(find(archive, "STUDY", StudyDate="20201231")) == {u for u, s in STUDIES.items() if s[2] == "20201231"}
    assert all(r.StudyDate for r in find(archive, "STUDY", StudyDate="-20301231", StudyInstanceUID=""))


def test_time_ranges_and_combined_datetime(archive: Archive) -> None:
    late = {u for u, s in STUDIES.items() if s[3].startswith("2359")}
    assert uids(find(archive, "STUDY", StudyTime="2300-")) == late
    assert uids(find(archive, "STUDY", StudyTime="-2359", StudyDate="20201231")) == late  # 235959.5 within 2359
    assert uids(find(archive, "STUDY", StudyTime="1015")) == {u for u, s in STUDIES.items() if s[3] == "101500"}
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyDate, ds.StudyTime, ds.StudyInstanceUID = "STUDY", "20200115-20201231", \
        "1200-0900", ""
    separate = parse_identifier(ds, "STUDY")
    assert list(run_query(archive.index, separate)) == []  # 12:00 ≤ t ≤ 09:00 never holds
    combined = parse_identifier(ds, "STUDY", combined_datetime=True)
    got = {r.StudyInstanceUID for r in run_query(archive.index, combined)}
    assert got == set()  # 2020-01-15 10:15 is before 12:00 and 2020-12-31 23:59 after 09:00
    ds.StudyTime = "1000-2359"
    got = {r.StudyInstanceUID for r in run_query(archive.index, parse_identifier(ds, "STUDY", combined_datetime=True))}
    assert got == studies_of("P1")


def test_wildcards_and_case(archive: Archive) -> None:
    assert uids(find(archive, "STUDY", PatientName="SMITH*")) == studies_of("P1") | studies_of("P2")
    assert uids(find(archive, "STUDY", PatientName="SMITH*", case_insensitive=False)) == studies_of("P1")
    assert uids(find(archive, "STUDY", PatientName="smith^john", case_insensitive=False)) == set()
    assert uids(find(archive, "STUDY", PatientName="smith^john")) == studies_of("P1")
    assert uids(find(archive, "STUDY", PatientName="J?NES^B*")) == studies_of("P3")
    assert uids(find(archive, "STUDY", PatientID="P?")) == studies_of("P1") | studies_of("P2") | studies_of("P3")
    assert uids(find(archive, "STUDY", ModalitiesInStudy="MR")) == {u for u, s in STUDIES.items()
                                                                     if any(m == "MR" for _, m, _ in s[5])}
    assert uids(find(archive, "STUDY", ModalitiesInStudy="PT\\MR")) == {
        u for u, s in STUDIES.items() if any(m in ("PT", "MR") for _, m, _ in s[5])}
    assert uids(find(archive, "STUDY", SOPClassesInStudy="1.2.3")) == set()


@pytest.mark.parametrize("insensitive", [True, False])
@pytest.mark.parametrize("name", WEIRD_NAMES)
def test_special_characters_match_literally(archive: Archive, name: str, insensitive: bool) -> None:
    expected = {u for u, s in STUDIES.items() if s[1] == name}
    assert len(expected) == 1
    assert uids(find(archive, "STUDY", PatientName=name, case_insensitive=insensitive)) == expected
    assert uids(find(archive, "STUDY", PatientName=name[:4] + "*", case_insensitive=insensitive)) == expected
    assert uids(find(archive, "STUDY", PatientID="W*", PatientName="*" + name[-3:], case_insensitive=insensitive)) \
        == expected


def test_value_lists(archive: Archive) -> None:
    assert uids(find(archive, "STUDY", PatientName="jones^bob\\smith^j*")) == studies_of("P1") | studies_of("P3")
    assert uids(find(archive, "STUDY", ModalitiesInStudy="PT\\OT", PatientID="P*")) == studies_of("P2")
    assert uids(find(archive, "STUDY", AccessionNumber="ACC1\\ACC4")) == {
        u for u, s in STUDIES.items() if s[4] in ("ACC1", "ACC4")}


def test_sql_metacharacters_are_not_wildcards(archive: Archive) -> None:
    for pattern in ("%", "_", "%%", "under%", "br[a-z]*", "!%"):
        assert find(archive, "STUDY", PatientName=pattern) == [], pattern
    assert find(archive, "STUDY", PatientID="' OR '1'='1") == []
    assert len(find(archive, "PATIENT", "PATIENT", PatientID="W0")) == 1  # the table is still there


# -- character sets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("charset", "name", "patient_id"), [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "H31EXAMPLE"),
    (["", "ISO 2022 IR 87"], "山田^太郎", "H31EXAMPLE\\H32EXAMPLE"),  # one group of a multi-group name
    (["", "ISO 2022 IR 87"], "やまだ^たろう", "2008-4\\H31EXAMPLE\\H32EXAMPLE"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "I2EXAMPLE"),
    (["", "ISO 2022 IR 149"], "김희중", "2008-3"),
    ("ISO_IR 192", "Wang^XiaoDong=王^小東", "X1EXAMPLE"),
    ("GB18030", "Wang^XiaoDong=王^小东", "X2EXAMPLE"),
    ("ISO_IR 100", "Buc^Jérôme", "SCSFREN"),
    ("ISO_IR 100", "buc*", "SCSFREN"),
    ("ISO_IR 100", "äNEAS^RÜDIGER", "SCSGERM"),
    ("ISO_IR 126", "Διονυσιος", "SCSGREEK"),
    ("ISO_IR 144", "люкceмбypг", "SCSRUSS"),
    ("ISO_IR 127", "قباني^لنزار", "SCSARAB"),
    ("ISO_IR 138", "שרון^דבורה", "SCSHBRW"),
])
def test_names_in_each_character_set(archive: Archive, charset: object, name: str, patient_id: str) -> None:
    found = find(archive, "STUDY", charset=charset, PatientName=name, PatientID="")
    assert found and {r.PatientID for r in found} == set(patient_id.split("\\"))
    for response in found:  # decoded from the wire with the declared set
        assert response.SpecificCharacterSet
        if "*" not in name and "=" in name:
            assert str(response.PatientName) == name


def test_response_keeps_the_stored_set(archive: Archive) -> None:
    [r] = find(archive, "STUDY", PatientName="BUC^J*", PatientID="SCSFREN", StudyInstanceUID="")[:1]
    assert r.SpecificCharacterSet == "ISO_IR 100" and r.PatientName == "Buc^Jérôme"
    [a] = find(archive, "STUDY", PatientID="P3", PatientName="")
    assert "SpecificCharacterSet" not in a


@pytest.mark.parametrize(("patient_id", "charset", "name"), [
    ("2008-3", ["", "ISO 2022 IR 149"], "김희중"),
    ("I2EXAMPLE", ["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    ("H31EXAMPLE", ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("H32EXAMPLE", ["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    ("X2EXAMPLE", "GB18030", "Wang^XiaoDong=王^小东"),
])
def test_iso_2022_and_multibyte_studies_are_answered_in_their_own_set(archive: Archive, patient_id: str,
                                                                       charset: object, name: str) -> None:
    """The charset files' own sets (pydicom charset_files), and the name decoded from the encoded response."""
    [response] = find(archive, "STUDY", PatientID=patient_id, PatientName="", StudyInstanceUID="")
    assert response.SpecificCharacterSet == charset
    assert str(response.PatientName) == name


def test_a_value_the_study_set_cannot_hold_makes_the_response_utf8() -> None:
    from dcbnode.index.query.charset import response_charset

    assert response_charset(["Buc^Jérôme"], "ISO_IR 100") == "ISO_IR 100"
    assert response_charset(["Buc^Jérôme", "山田"], "ISO_IR 100") == "ISO_IR 192"
    assert response_charset(["やまだ^たろう"], "\\ISO 2022 IR 87") == ["", "ISO 2022 IR 87"]
    assert response_charset(["Jérôme"], "\\ISO 2022 IR 87") == "ISO_IR 192"  # the default repertoire is ASCII
    assert response_charset(["김희중"], "\\ISO 2022 IR 87") == "ISO_IR 192"
    assert response_charset(["山田"], "ISO 2022 IR 13\\ISO 2022 IR 87") == ["ISO 2022 IR 13", "ISO 2022 IR 87"]
    assert response_charset(["김희중"], "NOT A CHARSET") == "ISO_IR 192"
    assert response_charset(["plain"], "\\ISO 2022 IR 87") == ""


def test_every_charset_file_is_findable(archive: Archive) -> None:
    for path in sorted(CHARSET_DIR.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        patient_id = ds.get("PatientID") or path.stem
        assert find(archive, "PATIENT", "PATIENT", PatientID=patient_id, PatientName=""), path.name


# -- limits and streaming ------------------------------------------------------------------------------


def test_max_responses(archive: Archive) -> None:
    with pytest.raises(QueryError) as caught:
        find(archive, "STUDY", limit=3, StudyInstanceUID="")
    assert caught.value.status == 0xA700
    assert len(find(archive, "STUDY", limit=100, StudyInstanceUID="")) == len(STUDIES) + CHARSET_STUDIES


def test_streaming_can_stop_early(archive: Archive) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", ""
    results = run_query(archive.index, parse_identifier(ds, "STUDY"))
    assert next(results).StudyInstanceUID
    results.close()  # what a C-CANCEL does: the cursor and session end here
    assert len(list(run_query(archive.index, parse_identifier(ds, "STUDY")))) == len(STUDIES) + CHARSET_STUDIES


def test_charset_dir_exists() -> None:
    assert os.path.isdir(CHARSET_DIR)


# -- performance shape: batched derived attributes, index use ------------------------------------------------

DERIVED_STUDY_KEYS = {"StudyInstanceUID": "", "PatientName": "", "ModalitiesInStudy": "", "SOPClassesInStudy": "",
                      "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
                      "NumberOfPatientRelatedStudies": ""}


def _sqlite_only(archive: Archive) -> None:
    if archive.index.engine.dialect.name != "sqlite":
        pytest.skip("SQLite query plan")


@pytest.fixture
def statements(archive: Archive) -> Iterator[list[str]]:
    """Every SQL statement the index runs during the test."""
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    event.listen(archive.index.engine, "before_cursor_execute", record)
    yield seen
    event.remove(archive.index.engine, "before_cursor_execute", record)


def test_derived_attributes_take_one_query_per_batch(archive: Archive, statements: list[str]) -> None:
    found = find(archive, "STUDY", **DERIVED_STUDY_KEYS)
    assert len(found) == len(STUDIES) + CHARSET_STUDIES
    # the matches, the per-series counts/modalities of the studies, their patients' studies, SOP classes
    assert len(statements) == 4, statements


@pytest.mark.parametrize(("level", "model", "keys"), [
    ("PATIENT", "PATIENT", {"PatientID": "", "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
                            "NumberOfPatientRelatedInstances": "", "PatientAge": ""}),
    ("STUDY", "STUDY", {**DERIVED_STUDY_KEYS, "NumberOfPatientRelatedInstances": "", "StudyTime": "",
                        "PatientAge": ""}),
])
def test_batches_give_the_same_responses(archive: Archive, monkeypatch: pytest.MonkeyPatch, level: str,
                                         model: str, keys: dict) -> None:
    """Small batches (several grouped look-ups per query) answer exactly what one batch does."""
    whole = find(archive, level, model, **keys)
    monkeypatch.setattr(query_run, "_FETCH_BATCH", 3)
    assert find(archive, level, model, **keys) == whole
    assert len(whole) > 3


def test_derived_values_by_hand(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(query_run, "_FETCH_BATCH", 2)
    expected = {uid: (sorted({m for _, m, _ in s[5]}), len(s[5]), sum(n for _, _, n in s[5]))
                for uid, s in STUDIES.items()}
    found = {r.StudyInstanceUID: r for r in find(archive, "STUDY", StudyInstanceUID="", ModalitiesInStudy="",
                                                 NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                                                 PatientAge="")}
    for uid, (modalities, series, instances) in expected.items():
        r = found[uid]
        got = [r.ModalitiesInStudy] if isinstance(r.ModalitiesInStudy, str) else list(r.ModalitiesInStudy)
        assert (got, r.NumberOfStudyRelatedSeries, r.NumberOfStudyRelatedInstances) == (modalities, series, instances)
        assert r.PatientAge  # from the first stored instance's header, looked up per batch
    p1 = find(archive, "PATIENT", "PATIENT", PatientID="P1", NumberOfPatientRelatedInstances="")
    assert p1[0].NumberOfPatientRelatedInstances == 6


def test_response_values_have_pydicom_types(archive: Archive) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.PatientID, ds.PatientName, ds.StudyInstanceUID = "STUDY", "P1", "", ""
    ds.ModalitiesInStudy, ds.NumberOfStudyRelatedInstances, ds.StudyDate = "", "", ""
    r = next(iter(run_query(archive.index, parse_identifier(ds, "STUDY"))))
    assert isinstance(r.PatientName, pydicom.valuerep.PersonName) and r.PatientName.family_name == "SMITH"
    assert isinstance(r.StudyInstanceUID, pydicom.uid.UID)
    assert isinstance(r.NumberOfStudyRelatedInstances, pydicom.valuerep.IS)
    assert isinstance(r.StudyDate, str) and r.StudyDate in ("20200115", "20201231")


@pytest.mark.parametrize(("keys", "index"), [
    ({"StudyDate": "20200101-20200201"}, "ix_studies_study_date"),
    ({"StudyDate": "20200101-"}, "ix_studies_study_date"),
    ({"PatientID": "P1"}, "ix_patients"),
    ({"AccessionNumber": "ACC1"}, "ix_studies_accession_number"),
])
def test_study_queries_search_an_index(archive: Archive, keys: dict, index: str) -> None:
    _sqlite_only(archive)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword, value in {**DERIVED_STUDY_KEYS, **keys}.items():
        setattr(ds, keyword, value)
    stmt, _ = build_select(parse_identifier(ds, "STUDY"), "sqlite")
    compiled = stmt.compile(archive.index.engine)  # type: ignore[attr-defined]
    with archive.index.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}",
                                                        tuple(compiled.params.values()))]
    assert any(step.startswith("SEARCH") and index in step for step in plan), plan
    assert not any(step.startswith("SCAN studies") for step in plan), plan


def test_combined_datetime_range_searches_the_date_index(archive: Archive) -> None:
    _sqlite_only(archive)
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyDate, ds.StudyTime, ds.StudyInstanceUID = "STUDY", "20200115-20201231", \
        "1000-2359", ""
    stmt, _ = build_select(parse_identifier(ds, "STUDY", combined_datetime=True), "sqlite")
    compiled = stmt.compile(archive.index.engine)  # type: ignore[attr-defined]
    with archive.index.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}",
                                                        tuple(compiled.params.values()))]
    assert any("ix_studies_study_date (study_date>? AND study_date<?)" in step for step in plan), plan


def test_bench_names_are_realistic() -> None:
    """bench/find_latency.py: SMITH* matches ~1 % of patients, as in a real population."""
    import random

    from bench.find_latency import patient_names

    names = patient_names(20_000, random.Random(1))
    share = sum(n.startswith("SMITH") for n in names) / len(names)
    assert 0.005 <= share <= 0.015
    assert len({n.split("^")[0] for n in names}) > 1_000
