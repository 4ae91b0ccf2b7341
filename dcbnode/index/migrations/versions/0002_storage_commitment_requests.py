"""Storage commitment requests waiting for their report (``commitment_requests``, see
``dcbnode/archive/commitment.py``): a new table, nothing else changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commitment_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("references", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("not_before", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_commitment_requests_not_before", "commitment_requests", ["not_before"])
    op.create_index("ix_commitment_requests_transaction_uid", "commitment_requests", ["transaction_uid"])


def downgrade() -> None:
    op.drop_index("ix_commitment_requests_transaction_uid", table_name="commitment_requests")
    op.drop_index("ix_commitment_requests_not_before", table_name="commitment_requests")
    op.drop_table("commitment_requests")
