"""The index as dcbnode 0.1.0 created it (``Base.metadata.create_all``, no version table).

On an empty database this creates the tables.  An index written by 0.1.0 has them already: the tables
missing from it are created and the others left as they are, so that ``dcbnode-admin upgrade`` adopts
it with its data.  The tables are frozen here, as they were in that release: later changes of
``dcbnode/index/models.py`` belong in later revisions, never in this one.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_UID = sa.String(64)
_PERSON_NAME = sa.String(324)


def tables() -> sa.MetaData:
    """The tables of 0.1.0 (tests use them to make an index as that release left it)."""
    metadata = sa.MetaData()
    sa.Table(
        "patients", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False, index=True),
        sa.Column("issuer_of_patient_id", sa.String(64), nullable=False),
        sa.Column("patient_name", _PERSON_NAME, nullable=False),
        sa.Column("patient_name_folded", _PERSON_NAME, nullable=False, index=True),
        sa.Column("patient_birth_date", sa.String(8), nullable=False),
        sa.Column("patient_sex", sa.String(16), nullable=False),
        sa.Index("ix_patients_identity", "patient_id", "issuer_of_patient_id", unique=True),
    )
    sa.Table(
        "studies", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patients.id"), nullable=False, index=True),
        sa.Column("study_instance_uid", _UID, nullable=False, unique=True),
        sa.Column("study_date", sa.String(8), nullable=False, index=True),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False, index=True),
        sa.Column("study_id", sa.String(16), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.Column("referring_physician_name", _PERSON_NAME, nullable=False),
        sa.Column("referring_physician_name_folded", _PERSON_NAME, nullable=False),
        sa.Column("specific_character_set", sa.String(128), nullable=False),
    )
    sa.Table(
        "series", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_pk", sa.Integer, sa.ForeignKey("studies.id"), nullable=False, index=True),
        sa.Column("series_instance_uid", _UID, nullable=False, unique=True),
        sa.Column("modality", sa.String(16), nullable=False, index=True),
        sa.Column("series_number", sa.Integer, nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("body_part_examined", sa.String(16), nullable=False),
    )
    sa.Table(
        "volumes", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.String(512), nullable=False, unique=True),
        sa.Column("indexed_end", sa.BigInteger, nullable=False),
    )
    sa.Table(
        "instances", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False, index=True),
        sa.Column("sop_instance_uid", _UID, nullable=False, unique=True),
        sa.Column("sop_class_uid", _UID, nullable=False, index=True),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("number_of_frames", sa.Integer, nullable=False),
        sa.Column("volume_pk", sa.Integer, sa.ForeignKey("volumes.id"), nullable=False, index=True),
        sa.Column("record_offset", sa.BigInteger, nullable=False),
        sa.Column("record_length", sa.BigInteger, nullable=False),
        sa.Column("received_bytes", sa.BigInteger, nullable=False),
        sa.Column("stored_bytes", sa.BigInteger, nullable=False),
        sa.Column("transfer_syntax_uid", _UID, nullable=False),
        sa.Column("source_ae_title", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Index("ix_instances_series_number", "series_pk", "instance_number"),
    )
    sa.Table(
        "pending_compression", metadata,
        sa.Column("volume_stem", sa.String(512), primary_key=True),
        sa.Column("since", sa.DateTime, nullable=False),
    )
    return metadata


def upgrade() -> None:
    tables().create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    tables().drop_all(op.get_bind())
