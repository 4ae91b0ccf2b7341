"""SQLAlchemy 2.x declarative models of the index (PS3.4 C.6 query attributes at each level)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
#: PN components can reach 64 characters each in five groups of three representations.
PERSON_NAME = String(324)


class Base(DeclarativeBase):
    """Declarative base of the index models."""


class Patient(Base):
    """A patient, identified by Patient ID (and issuer, when given)."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(PERSON_NAME, default="")
    #: case-folded patient_name, for case-insensitive matching in any character set
    patient_name_folded: Mapped[str] = mapped_column(PERSON_NAME, default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    studies: Mapped[list[Study]] = relationship(back_populates="patient")

    __table_args__ = (Index("ix_patients_identity", "patient_id", "issuer_of_patient_id", unique=True),)


class Study(Base):
    """A study."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(PERSON_NAME, default="")
    referring_physician_name_folded: Mapped[str] = mapped_column(PERSON_NAME, default="")
    #: Specific Character Set of the first instance received, for encoding responses
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series: one DCBS volume."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class VolumeRow(Base):
    """A volume file and how far into it the index is known to be complete."""

    __tablename__ = "volumes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: path relative to the data directory (never built from a raw UID)
    path: Mapped[str] = mapped_column(String(512), unique=True)
    #: end of the last record reflected in the index; recovery reads only what lies beyond
    indexed_end: Mapped[int] = mapped_column(BigInteger, default=0)


class Instance(Base):
    """An instance and where its record lives."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    volume_pk: Mapped[int] = mapped_column(ForeignKey("volumes.id"), index=True)
    record_offset: Mapped[int] = mapped_column(BigInteger)
    record_length: Mapped[int] = mapped_column(BigInteger)
    received_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    source_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime)
    series: Mapped[Series] = relationship(back_populates="instances")
    volume: Mapped[VolumeRow] = relationship()

    __table_args__ = (Index("ix_instances_series_number", "series_pk", "instance_number"),)


class PendingCompression(Base):
    """A series volume that holds frames whose compression the node deferred (codec ``raw``).

    Written in the same transaction that indexes such a record, removed by the compaction that
    compresses them: after a restart, the node knows which volumes still wait without reading them.
    """

    __tablename__ = "pending_compression"
    #: the volume's path without generation and extension (the same for all its generations)
    volume_stem: Mapped[str] = mapped_column(String(512), primary_key=True)
    since: Mapped[datetime] = mapped_column(DateTime)


class CommitmentRequest(Base):
    """A Storage Commitment request (PS3.4 J.3.2) whose N-EVENT-REPORT has not been delivered yet.

    Written before the N-ACTION is answered, deleted once the report was delivered: after a restart the
    node still answers every request it accepted.  A sender takes a request with a row-level update of
    ``claimed_by`` (see :mod:`dcbnode.archive.commitment`), so several node processes can share the table.
    """

    __tablename__ = "commitment_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, index=True)
    #: the requesting AE (its [peers] entry says where a report on a new association goes)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    #: JSON list of [SOP Class UID, SOP Instance UID] pairs, in the request's order
    references: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    #: no sender takes the request before this time (a failed delivery waits for its retry)
    not_before: Mapped[datetime] = mapped_column(DateTime, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: the sender working on it (None: free); a claim older than the lease is taken over
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: why the last delivery failed (for ``dcbnode-admin commitments``); None before any failure
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

