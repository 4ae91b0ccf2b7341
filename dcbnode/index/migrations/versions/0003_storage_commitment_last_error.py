"""Why the last delivery of a storage commitment report failed (``commitment_requests.last_error``, shown
by ``dcbnode-admin commitments``): one nullable column, nothing else changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commitment_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("commitment_requests", schema=None) as batch_op:
        batch_op.drop_column("last_error")
