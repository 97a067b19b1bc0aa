"""tasks.privacy: the privacy ledger of central differential privacy

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 23:00:00.000000

Nullable, no backfill: tasks created before have no differential privacy. The JSON holds the
sampling rate of the task's open round, the rounds released under central DP grouped by
(sampling rate, noise multiplier) and the epsilon they spent (docs/privacy.md).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("privacy", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("privacy")
