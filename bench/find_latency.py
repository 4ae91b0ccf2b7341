"""C-FIND latency on a large index, and Archive.store ingest speed with an empty vs a full index.

The index is filled directly with SQLAlchemy Core bulk inserts (not through the network): by default 10,000
studies x 2 series (CT, MR) x 50 instances = 1,000,000 instances, plus one 500-instance series; 5,000
patients with 2 studies each, study dates uniform over 10 years.  Patient names are realistic: surnames
drawn from 3,000 with Zipf frequencies (exponent 0.5), so SMITH is the commonest at ~0.9 % of patients and
``SMITH*`` (SMITH plus four rare SMITH… surnames) matches ~1 % of patients (~110 studies), as in a real
census; a 20-surname list would make SMITH* match 10 % and measure response building, not matching.

What a query's latency is: ``parse_identifier`` + ``run_query`` until its last response dataset is built
(every response materialised), i.e. the time the C-FIND SCP spends producing all pending responses.  It
excludes the network, the DIMSE encoding of responses by pynetdicom and association set-up.  STUDY queries
ask for the attributes a PACS study list shows, including the derived ModalitiesInStudy and
NumberOfStudyRelatedInstances (computed per query, not stored).  p50/p95 over ``--repeat`` runs with varied
keys (random PatientID, random 7-day window), on a warm cache (the index fits in memory).
"STUDY by StudyDate 1-year range" (~1,000 responses) has no target: it shows the per-response cost.
PostgreSQL too when ``$DCBNODE_TEST_POSTGRES_URL`` is set (in a fresh database, dropped afterwards).

    python bench/find_latency.py [--instances N] [--repeat R] [--stores S]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import insert

from bench._benchlib import machine_info, write_results
from dcbnode.archive import Archive
from dcbnode.index.attributes import fold_name
from dcbnode.index.models import Instance, Patient, Series, Study, VolumeRow
from dcbnode.index.query import parse_identifier, run_query

#: the most frequent surnames first; the rest of the list is synthetic (see :func:`surnames`)
COMMON_SURNAMES = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ",
                   "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR",
                   "MOORE", "JACKSON", "MARTIN", "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ",
                   "CLARK", "RAMIREZ", "LEWIS", "ROBINSON", "MÜLLER", "SCHMIDT", "NGUYEN", "DUPONT", "ROSSI",
                   "KIM", "TANAKA", "PETROV", "HANSEN", "SILVA", "CHEN", "WANG", "NOVAK", "JANSEN", "BERNARD"]
#: rare surnames that also match SMITH* (placed deep in the frequency ranking)
SMITH_LIKE = ["SMITHERS", "SMITHSON", "SMITHE", "SMITHWICK"]
GIVEN = ["JOHN", "ANNA", "PETER", "MARIA", "YUKI", "OMAR", "LENA", "IVAN", "SARA", "TOM", "JAMES", "MARY",
         "ROBERT", "LINDA", "DAVID", "ELENA", "WEI", "FATIMA", "LUCAS", "EMMA", "NOAH", "OLIVIA", "HUGO", "MIA"]
SURNAME_COUNT = 3000
#: Zipf exponent of the surname frequencies: 0.5 over 3,000 names gives the first (SMITH) ~0.9 % of patients,
#: about its share in the US census; SMITH* (SMITH + 4 rare SMITH… names) then matches ~1 % of patients.
ZIPF_EXPONENT = 0.5
BIG_SERIES_INSTANCES = 500
_WARMUP_STORES = 5
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def surnames(count: int = SURNAME_COUNT, seed: int = 3) -> list[str]:
    """``count`` distinct surnames by decreasing frequency: the common ones, then synthetic syllable names."""
    rng = random.Random(seed)
    onsets = ["B", "BR", "C", "CH", "D", "F", "G", "GR", "H", "J", "K", "KR", "L", "M", "N", "P", "PR", "R",
              "S", "ST", "T", "TR", "V", "W", "Z"]
    vowels = ["A", "E", "I", "O", "U", "AI", "EA", "OU"]
    codas = ["", "N", "R", "L", "S", "K", "M", "NT", "RD", "SK", "TZ", "LL", "NG"]
    names = list(dict.fromkeys(COMMON_SURNAMES))
    seen = set(names) | set(SMITH_LIKE)
    while len(names) < count - len(SMITH_LIKE):
        name = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.choice((2, 2, 3))))
        if name not in seen and not name.startswith("SMITH"):
            seen.add(name)
            names.append(name)
    for k, name in enumerate(SMITH_LIKE):  # ranks ~1,000 … 2,500: rare
        names.insert(1000 + k * 500, name)
    return names


def patient_names(patients: int, rng: random.Random) -> list[str]:
    """Realistic PatientName values: Zipf-distributed surnames (:data:`ZIPF_EXPONENT`), uniform given names."""
    pool = surnames()
    weights = [1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(pool))]
    chosen = rng.choices(pool, weights=weights, k=patients)
    return [f"{surname}^{rng.choice(GIVEN)}" for surname in chosen]


def fill(archive: Archive, instances: int, seed: int = 7) -> dict[str, Any]:
    """Bulk-insert studies x 2 series x 50 instances (+ one 500-instance series); returns what to query."""
    rng = random.Random(seed)
    studies = max(1, instances // 100)
    patients = max(1, studies // 2)
    start = time.perf_counter()
    engine = archive.index.engine
    with engine.begin() as conn:
        volume_row = insert(VolumeRow).values(path="volumes/bench.dcbs", indexed_end=0)
        volume = conn.execute(volume_row).inserted_primary_key[0]
        names = patient_names(patients, rng)
        smith = sum(name.startswith("SMITH") for name in names)
        conn.execute(insert(Patient), [
            {"id": p + 1, "patient_id": f"PID{p:07d}", "issuer_of_patient_id": "", "patient_name": names[p],
             "patient_name_folded": fold_name(names[p]), "patient_birth_date": "19600101", "patient_sex": "O"}
            for p in range(patients)])
        base = datetime(2015, 1, 1).toordinal()
        conn.execute(insert(Study), [
            {"id": s + 1, "patient_pk": s % patients + 1, "study_instance_uid": f"1.2.826.0.1.3680043.9.1.{s}",
             "study_date": datetime.fromordinal(base + rng.randrange(3650)).strftime("%Y%m%d"),
             "study_time": f"{rng.randrange(24):02d}{rng.randrange(60):02d}00", "accession_number": f"A{s}",
             "study_id": str(s), "study_description": "BENCH", "referring_physician_name": "",
             "referring_physician_name_folded": "", "specific_character_set": "ISO_IR 192"}
            for s in range(studies)])
        series_rows = [{"id": s * 2 + k + 1, "study_pk": s + 1,
                        "series_instance_uid": f"1.2.826.0.1.3680043.9.2.{s}.{k}",
                        "modality": ("CT", "MR")[k], "series_number": k + 1, "series_description": "",
                        "body_part_examined": ""} for s in range(studies) for k in range(2)]
        big_series = len(series_rows) + 1
        series_rows.append({"id": big_series, "study_pk": 1, "series_instance_uid": "1.2.826.0.1.3680043.9.3",
                            "modality": "CT", "series_number": 99, "series_description": "BIG",
                            "body_part_examined": ""})
        conn.execute(insert(Series), series_rows)
        now = datetime.now()
        per_series = max(1, instances // (studies * 2))
        batch: list[dict[str, Any]] = []
        plan = [(sr, per_series) for sr in range(1, big_series)] + [(big_series, BIG_SERIES_INSTANCES)]
        counter = 0
        for series_pk, count in plan:
            for number in range(1, count + 1):
                counter += 1
                batch.append({"id": counter, "series_pk": series_pk,
                              "sop_instance_uid": f"1.2.826.0.1.3680043.9.4.{counter}",
                              "sop_class_uid": CT if series_pk % 2 else MR, "instance_number": number,
                              "number_of_frames": 1, "volume_pk": volume, "record_offset": counter * 1000,
                              "record_length": 1000, "received_bytes": 1000, "stored_bytes": 1000,
                              "transfer_syntax_uid": "1.2.840.10008.1.2.1", "source_ae_title": "BENCH",
                              "received_at": now})
                if len(batch) >= 50_000:
                    conn.execute(insert(Instance), batch)
                    batch.clear()
        if batch:
            conn.execute(insert(Instance), batch)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
            for table in ("patients", "studies", "series", "instances"):
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT max(id) FROM {table}))")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return {"fill_seconds": time.perf_counter() - start, "instances": counter, "studies": studies,
            "patients": patients, "smith_patients": smith, "big_series": "1.2.826.0.1.3680043.9.3",
            "big_study": "1.2.826.0.1.3680043.9.1.0"}


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


STUDY_KEYS = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": "", "StudyTime": "",
              "AccessionNumber": "", "StudyDescription": "", "ModalitiesInStudy": "",
              "NumberOfStudyRelatedInstances": ""}


def time_query(archive: Archive, make: Callable[[random.Random], Dataset], repeat: int) -> dict[str, float]:
    """p50/p95 (ms) of parse + run + build every response, and the mean number of responses."""
    rng = random.Random(11)
    seconds, counts = [], []
    for _ in range(repeat):
        identifier = make(rng)
        start = time.perf_counter()
        responses = list(run_query(archive.index, parse_identifier(identifier, "STUDY"), retrieve_ae_title="BENCH"))
        seconds.append(time.perf_counter() - start)
        counts.append(len(responses))
    seconds.sort()
    return {"p50_ms": 1000 * statistics.median(seconds), "p95_ms": 1000 * seconds[int(0.95 * (len(seconds) - 1))],
            "mean_responses": statistics.mean(counts)}


def queries(archive: Archive, info: dict[str, Any], repeat: int) -> dict[str, dict[str, float]]:
    patients = info["patients"]

    def by_patient_id(rng: random.Random) -> Dataset:
        return _identifier("STUDY", **{**STUDY_KEYS, "PatientID": f"PID{rng.randrange(patients):07d}"})

    def by_name(_: random.Random) -> Dataset:
        return _identifier("STUDY", **{**STUDY_KEYS, "PatientName": "SMITH*"})

    def by_date(rng: random.Random) -> Dataset:
        day = datetime.fromordinal(datetime(2015, 1, 1).toordinal() + rng.randrange(3600))
        end = datetime.fromordinal(day.toordinal() + 6)
        return _identifier("STUDY", **{**STUDY_KEYS, "StudyDate": f"{day:%Y%m%d}-{end:%Y%m%d}"})

    def by_year(rng: random.Random) -> Dataset:
        day = datetime.fromordinal(datetime(2015, 1, 1).toordinal() + rng.randrange(3285))
        end = datetime.fromordinal(day.toordinal() + 364)
        return _identifier("STUDY", **{**STUDY_KEYS, "StudyDate": f"{day:%Y%m%d}-{end:%Y%m%d}"})

    def image(_: random.Random) -> Dataset:
        return _identifier("IMAGE", StudyInstanceUID=info["big_study"], SeriesInstanceUID=info["big_series"],
                           SOPInstanceUID="", SOPClassUID="", InstanceNumber="")

    return {"STUDY by PatientID": time_query(archive, by_patient_id, repeat),
            "STUDY by PatientName SMITH*": time_query(archive, by_name, max(5, repeat // 4)),
            "STUDY by StudyDate 7-day range": time_query(archive, by_date, repeat),
            "STUDY by StudyDate 1-year range": time_query(archive, by_year, max(5, repeat // 4)),
            "IMAGE of a 500-instance series": time_query(archive, image, max(5, repeat // 4))}


def ingest_rate(archive: Archive, stores: int) -> float:
    """Archive.store per second of CT_small with fresh UIDs."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    payloads = []
    for _ in range(stores + _WARMUP_STORES):
        template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        buffer = BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        payloads.append(buffer.getvalue())
    for payload in payloads[:_WARMUP_STORES]:  # untimed: first volume, imports, caches
        archive.store(payload)
    start = time.perf_counter()
    for payload in payloads[_WARMUP_STORES:]:
        archive.store(payload)
    return (len(payloads) - _WARMUP_STORES) / (time.perf_counter() - start)


def run(url_for: Callable[[Path], str], label: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dcbnode-find-") as tmp:
        empty = Archive(Path(tmp) / "empty", url_for(Path(tmp) / "empty"))
        empty_rate = ingest_rate(empty, args.stores)
        empty.close()
        archive = Archive(Path(tmp) / "full", url_for(Path(tmp) / "full"))
        info = fill(archive, args.instances)
        print(f"[{label}] filled {info['instances']:,} instances in {info['fill_seconds']:.1f} s", flush=True)
        results = queries(archive, info, args.repeat)
        full_rate = ingest_rate(archive, args.stores)
        archive.close()
    for name, row in results.items():
        print(f"[{label}] {name:34s} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms"
              f"  ({row['mean_responses']:.0f} responses)")
    change = 100 * (full_rate - empty_rate) / empty_rate
    print(f"[{label}] Archive.store: {empty_rate:.1f}/s empty index, {full_rate:.1f}/s full index ({change:+.1f} %)")
    return {"fill": info, "queries": results, "store_per_s_empty": empty_rate, "store_per_s_full": full_rate}


def _postgres(base: str, created: list[str]) -> Callable[[Path], str]:
    """URLs of fresh databases next to ``base`` (their names appended to ``created``, for :func:`_drop`)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    def url_for(_: Path) -> str:
        url = make_url(base)
        name = f"dcbnode_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        created.append(name)
        return url.set(database=name).render_as_string(hide_password=False)

    return url_for


def _drop(base: str, names: list[str]) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--stores", type=int, default=100)
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL even when configured")
    args = parser.parse_args()
    payload: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    payload["sqlite"] = run(lambda d: f"sqlite:///{d}/index.sqlite", "sqlite", args)
    base = os.environ.get("DCBNODE_TEST_POSTGRES_URL")
    if base and not args.sqlite_only:
        created: list[str] = []
        try:
            payload["postgresql"] = run(_postgres(base, created), "postgresql", args)
        finally:
            _drop(base, created)
    print(f"results: {write_results('find_latency', payload)}")


if __name__ == "__main__":
    main()
