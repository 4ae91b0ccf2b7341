"""Writing instances into the index (and removing them), with get-or-create of the levels above."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .attributes import IndexAttributes, fold_name
from .models import Instance, Patient, PendingCompression, Series, Study, VolumeRow


@dataclass(frozen=True, slots=True)
class RecordPlacement:
    """Where an instance's record is and what it cost."""

    volume_path: str  #: relative to the data directory
    offset: int
    length: int
    received_bytes: int
    stored_bytes: int
    transfer_syntax_uid: str
    source_ae_title: str


def volume_row(session: Session, path: str) -> VolumeRow:
    """The row of a volume, created if missing."""
    row = session.scalar(select(VolumeRow).where(VolumeRow.path == path))
    if row is None:
        row = VolumeRow(path=path, indexed_end=0)
        session.add(row)
        session.flush()
    return row


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The index row of an instance, or None."""
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


class LevelCache:
    """Primary keys of the series and volumes already indexed, with the attributes last written.

    Ingest writes one instance row per store; the patient, study and series rows above it change
    rarely, so they are only rewritten when their attributes differ from the cached ones.  The cache
    may be stale (another process deleted a series): the foreign key then fails, the caller clears
    the cache and retries.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, tuple[int, tuple]] = {}
        self._volumes: dict[str, int] = {}

    def series(self, uid: str, key: tuple) -> int | None:
        """The cached primary key of a series written with exactly these attributes."""
        with self._lock:
            cached = self._series.get(uid)
        return cached[0] if cached is not None and cached[1] == key else None

    def remember_series(self, uid: str, key: tuple, pk: int) -> None:
        """Cache a series row's primary key (after the transaction that wrote it committed)."""
        with self._lock:
            self._series[uid] = (pk, key)

    def volume(self, path: str) -> int | None:
        """The cached primary key of a volume row."""
        with self._lock:
            return self._volumes.get(path)

    def remember_volume(self, path: str, pk: int) -> None:
        """Cache a volume row's primary key."""
        with self._lock:
            self._volumes[path] = pk

    def clear(self) -> None:
        """Forget everything (after deletions, or a failed transaction)."""
        with self._lock:
            self._series.clear()
            self._volumes.clear()


# The per-instance statements use the tables, not the mapped classes: an ORM-enabled insert or update
# goes through SQLAlchemy's bulk-persistence machinery, which cost more than the SQL itself.
# They are built once, with bound parameters, so that SQLAlchemy's compiled-statement cache key is
# worked out once too.
_INSTANCES = Instance.__table__
_VOLUMES = VolumeRow.__table__
_LOCATED = _INSTANCES.join(_VOLUMES, _INSTANCES.c.volume_pk == _VOLUMES.c.id)
_LOCATION = (select(_VOLUMES.c.path, _INSTANCES.c.record_offset).select_from(_LOCATED)
             .where(_INSTANCES.c.sop_instance_uid == bindparam("uid")))
_INSERT_INSTANCE = insert(_INSTANCES)
_UPDATE_INSTANCE = update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
#: An insert that writes nothing if the SOP Instance UID has a row, by dialect (both have ON CONFLICT).
#: RETURNING says whether a row was written (rowcount is not reliable with RETURNING on every driver).
_INSERT_NEW_INSTANCE = {
    name: dialect.insert(_INSTANCES).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
    .returning(_INSTANCES.c.id)
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
}
_ADVANCE = (update(_VOLUMES).where(_VOLUMES.c.id == bindparam("volume"), _VOLUMES.c.indexed_end < bindparam("end"))
            .values(indexed_end=bindparam("end")))


_PENDING = PendingCompression.__table__


def mark_compression_pending(session: Session, volume_stem: str) -> None:
    """Record that the volume ``volume_stem`` holds raw frames (nothing if it is known already)."""
    connection = session.connection()
    if connection.execute(select(_PENDING.c.volume_stem).where(_PENDING.c.volume_stem == volume_stem)).first() is None:
        connection.execute(insert(_PENDING).values(volume_stem=volume_stem,
                                                   since=datetime.now(UTC).replace(tzinfo=None)))


def clear_compression_pending(session: Session, volume_stem: str) -> None:
    """The volume ``volume_stem`` holds no raw frames any more."""
    session.connection().execute(delete(_PENDING).where(_PENDING.c.volume_stem == volume_stem))


def compression_pending(connection: Connection) -> list[str]:
    """Stems of the volumes that hold raw frames, oldest first."""
    return list(connection.scalars(select(_PENDING.c.volume_stem).order_by(_PENDING.c.since)))


def instance_location(session: Session | Connection, sop_instance_uid: str) -> tuple[str, int] | None:
    """(volume path, record offset) of an indexed instance, or None."""
    connection = session.connection() if isinstance(session, Session) else session
    row = connection.execute(_LOCATION, {"uid": sop_instance_uid}).first()
    return None if row is None else (row[0], row[1])


def indexed_generations(connection: Connection, stem: str) -> list[str]:
    """Paths of the indexed volumes named ``<stem>.dcbs`` or ``<stem>.gN.dcbs``.

    A prefix LIKE, not a range on the path index: PostgreSQL's locale collations do not order
    punctuation bytewise.  It scans the volumes table (one row per series), once per series and
    process: the archive caches the answer.
    """
    rows = connection.execute(select(_VOLUMES.c.path).where(_VOLUMES.c.path.startswith(stem + ".", autoescape=True)))
    return [path for (path,) in rows]


def instance_locations(session: Session, sop_instance_uids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """(volume path, record offset) of each indexed instance among ``sop_instance_uids``, in one query
    (callers keep the list short: it becomes an IN clause)."""
    rows = session.connection().execute(
        select(_INSTANCES.c.sop_instance_uid, _VOLUMES.c.path, _INSTANCES.c.record_offset).select_from(_LOCATED)
        .where(_INSTANCES.c.sop_instance_uid.in_(sop_instance_uids))
    )
    return {uid: (path, offset) for uid, path, offset in rows}


def upsert_instance(
    session: Session,
    attributes: IndexAttributes,
    placement: RecordPlacement,
    cache: LevelCache | None = None,
    *,
    exists: bool | None = None,
    keep_existing: bool = False,
    advance: bool = True,
) -> bool:
    """Insert the instance (or point an existing row at its new record) and advance ``indexed_end``
    (unless ``advance`` is False: the caller advances it once for several records, :func:`advance_from`).

    ``exists`` says whether the instance already has a row, when the caller just looked (None: look).
    ``keep_existing`` instead inserts only if there is no row (one statement, no look first) and
    returns False, having written nothing, if there is one.
    Core statements rather than ORM objects: this runs once per received instance, inside the
    volume's append lock, so every round trip counts.
    """
    cache = cache or LevelCache()
    series_pk = _series_pk(session, attributes, cache)
    volume_pk = _volume_pk(session, placement.volume_path, cache)
    values = {
        "series_pk": series_pk,
        "sop_class_uid": attributes.sop_class_uid,
        "instance_number": attributes.instance_number,
        "number_of_frames": attributes.number_of_frames,
        "volume_pk": volume_pk,
        "record_offset": placement.offset,
        "record_length": placement.length,
        "received_bytes": placement.received_bytes,
        "stored_bytes": placement.stored_bytes,
        "transfer_syntax_uid": placement.transfer_syntax_uid,
        "source_ae_title": placement.source_ae_title,
        "received_at": datetime.now(UTC).replace(tzinfo=None),
    }
    connection = session.connection()
    uid = attributes.sop_instance_uid
    if keep_existing:
        inserted = connection.execute(_INSERT_NEW_INSTANCE[connection.dialect.name],
                                      {"sop_instance_uid": uid, **values})
        if inserted.first() is None:  # RETURNING gave no row: the UID has one already
            return False
    else:
        if exists is None:
            exists = instance_location(session, uid) is not None
        if exists:
            connection.execute(_UPDATE_INSTANCE, {"uid": uid, **values})
        else:
            connection.execute(_INSERT_INSTANCE, {"sop_instance_uid": uid, **values})
    if advance:
        _advance(session, volume_pk, placement.offset + placement.length)
    return True


def _advance(session: Session, volume_pk: int, end: int) -> None:
    session.connection().execute(_ADVANCE, {"volume": volume_pk, "end": end})


_ADVANCE_FROM = (update(_VOLUMES).where(_VOLUMES.c.id == bindparam("volume"),
                                       _VOLUMES.c.indexed_end == bindparam("start"))
                 .values(indexed_end=bindparam("end")))


def advance_from(session: Session, path: str, start: int, end: int, cache: LevelCache) -> bool:
    """Move the volume's ``indexed_end`` from ``start`` to ``end``; False (nothing changed) if it was not at
    ``start``: the index does not reflect the volume up to there."""
    volume_pk = _volume_pk(session, path, cache)
    return session.connection().execute(_ADVANCE_FROM, {"volume": volume_pk, "start": start, "end": end}).rowcount == 1


def _volume_pk(session: Session, path: str, cache: LevelCache) -> int:
    pk = cache.volume(path)
    if pk is None:
        pk = volume_row(session, path).id
        cache.remember_volume(path, pk)
    return pk


def _series_pk(session: Session, attributes: IndexAttributes, cache: LevelCache) -> int:
    key = _level_key(attributes)
    pk = cache.series(attributes.series_instance_uid, key)
    if pk is None:
        pk = _series(session, attributes).id
        cache.remember_series(attributes.series_instance_uid, key, pk)
    return pk


_INSTANCE_LEVEL = frozenset({"sop_instance_uid", "sop_class_uid", "instance_number", "number_of_frames"})
_LEVEL_FIELDS = tuple(f.name for f in fields(IndexAttributes) if f.name not in _INSTANCE_LEVEL)


def _level_key(attributes: IndexAttributes) -> tuple:
    """The attributes written to the patient, study and series rows."""
    return tuple(getattr(attributes, name) for name in _LEVEL_FIELDS)


def remove_instance(session: Session, sop_instance_uid: str) -> bool:
    """Delete an instance row, and the series/study/patient rows it leaves empty."""
    instance = find_instance(session, sop_instance_uid)
    if instance is None:
        return False
    series = instance.series
    session.delete(instance)
    session.flush()
    if not session.scalar(select(func.count()).select_from(Instance).where(Instance.series_pk == series.id)):
        study = series.study
        session.delete(series)
        session.flush()
        if not session.scalar(select(func.count()).select_from(Series).where(Series.study_pk == study.id)):
            patient = study.patient
            session.delete(study)
            session.flush()
            if not session.scalar(select(func.count()).select_from(Study).where(Study.patient_pk == patient.id)):
                session.delete(patient)
    session.flush()
    return True


def indexed_end(session: Session, path: str) -> int:
    """How far the index reflects a volume (0 for a volume it has no row for)."""
    end = session.connection().execute(select(_VOLUMES.c.indexed_end).where(_VOLUMES.c.path == path)).scalar()
    return 0 if end is None else int(end)


def relocate_instance(session: Session, sop_instance_uid: str, path: str, offset: int, new_offset: int,
                      new_length: int) -> bool:
    """Point an instance's row from its record at ``offset`` in volume ``path`` to a copy of that record at
    ``new_offset`` in the same volume; False (nothing changed) if the row points elsewhere now."""
    volume_pk = volume_row(session, path).id
    moved = session.connection().execute(
        update(_INSTANCES).where(_INSTANCES.c.sop_instance_uid == sop_instance_uid,
                                 _INSTANCES.c.volume_pk == volume_pk, _INSTANCES.c.record_offset == offset)
        .values(record_offset=new_offset, record_length=new_length)).rowcount == 1
    if moved:
        _advance(session, volume_pk, new_offset + new_length)
    return moved


def advance_indexed_end(session: Session, path: str, end: int) -> None:
    """Record that everything in a volume up to ``end`` is reflected in the index."""
    _advance(session, volume_row(session, path).id, end)


def clear_all(session: Session) -> None:
    """Delete every row (reindex rebuilds from the volumes)."""
    for model in (Instance, VolumeRow, Series, Study, Patient, PendingCompression):
        session.execute(delete(model))


def _patient(session: Session, attributes: IndexAttributes) -> Patient:
    patient = session.scalar(select(Patient).where(Patient.patient_id == attributes.patient_id,
                                                   Patient.issuer_of_patient_id == attributes.issuer_of_patient_id))
    if patient is None:
        patient = Patient(patient_id=attributes.patient_id, issuer_of_patient_id=attributes.issuer_of_patient_id)
        session.add(patient)
    # Demographics follow the latest instance received, as most archives do.
    patient.patient_name = attributes.patient_name
    patient.patient_name_folded = fold_name(attributes.patient_name)
    patient.patient_birth_date = attributes.patient_birth_date
    patient.patient_sex = attributes.patient_sex
    return patient


def _study(session: Session, attributes: IndexAttributes) -> Study:
    patient = _patient(session, attributes)
    study = session.scalar(select(Study).where(Study.study_instance_uid == attributes.study_instance_uid))
    if study is None:
        study = Study(study_instance_uid=attributes.study_instance_uid,
                      specific_character_set=attributes.specific_character_set, patient=patient)
        session.add(study)
    elif study.patient is not patient:
        # The study now belongs to another patient (a corrected Patient ID): a patient left without
        # studies would still answer PATIENT-level C-FINDs.
        previous = study.patient
        study.patient = patient
        session.flush()
        if not session.scalar(select(func.count()).select_from(Study).where(Study.patient_pk == previous.id)):
            session.delete(previous)
    study.study_date = attributes.study_date
    study.study_time = attributes.study_time
    study.accession_number = attributes.accession_number
    study.study_id = attributes.study_id
    study.study_description = attributes.study_description
    study.referring_physician_name = attributes.referring_physician_name
    study.referring_physician_name_folded = fold_name(attributes.referring_physician_name)
    return study


def _series(session: Session, attributes: IndexAttributes) -> Series:
    study = _study(session, attributes)
    series = session.scalar(select(Series).where(Series.series_instance_uid == attributes.series_instance_uid))
    if series is None:
        series = Series(series_instance_uid=attributes.series_instance_uid, study=study)
        session.add(series)
    series.study = study
    series.modality = attributes.modality
    series.series_number = attributes.series_number
    series.series_description = attributes.series_description
    series.body_part_examined = attributes.body_part_examined
    session.flush()
    return series
