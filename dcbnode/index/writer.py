"""Writing instances into the index (and removing them), with get-or-create of the levels above."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .attributes import IndexAttributes, fold_name
from .models import Instance, Patient, Series, Study, VolumeRow


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


def upsert_instance(session: Session, attributes: IndexAttributes, placement: RecordPlacement) -> Instance:
    """Insert the instance (or point an existing row at its new record) and advance ``indexed_end``."""
    series = _series(session, attributes)
    session.flush()
    volume = volume_row(session, placement.volume_path)
    volume.indexed_end = max(volume.indexed_end, placement.offset + placement.length)
    instance = find_instance(session, attributes.sop_instance_uid)
    if instance is None:
        instance = Instance(sop_instance_uid=attributes.sop_instance_uid, series=series, volume=volume)
        session.add(instance)
    instance.series = series
    instance.sop_class_uid = attributes.sop_class_uid
    instance.instance_number = attributes.instance_number
    instance.number_of_frames = attributes.number_of_frames
    instance.volume = volume
    instance.record_offset = placement.offset
    instance.record_length = placement.length
    instance.received_bytes = placement.received_bytes
    instance.stored_bytes = placement.stored_bytes
    instance.transfer_syntax_uid = placement.transfer_syntax_uid
    instance.source_ae_title = placement.source_ae_title
    instance.received_at = datetime.now(UTC).replace(tzinfo=None)
    session.flush()
    return instance


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


def advance_indexed_end(session: Session, path: str, end: int) -> None:
    """Record that everything in a volume up to ``end`` is reflected in the index."""
    row = volume_row(session, path)
    row.indexed_end = max(row.indexed_end, end)


def clear_all(session: Session) -> None:
    """Delete every row (reindex rebuilds from the volumes)."""
    for model in (Instance, VolumeRow, Series, Study, Patient):
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
    study.patient = patient
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
    return series
