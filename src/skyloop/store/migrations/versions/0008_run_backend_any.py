"""run backend any: a queued run without a requested backend has none (NULL), and any agent claims it

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 18:45:00

Before this revision every queued run named a backend (the submitter's default when none was asked for)
that agents ignored. Runs already queued keep the backend they name, which agents now honour.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("backend", existing_type=sa.String(length=20), nullable=True)


def downgrade() -> None:
    op.execute(sa.text("UPDATE runs SET backend = 'local' WHERE backend IS NULL"))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("backend", existing_type=sa.String(length=20), nullable=False)
