"""tasks.pending_training: training settings changed on a live task, applied at its next round

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 23:00:00.000000

Nullable, no backfill: NULL means no change is waiting. ``PATCH /tasks/{id}`` on a running or
paused task stores the new training settings (lr, epochs, batch_size, proximal_mu) here, and
the round engine moves them into ``training`` when it opens the task's next round, so every
device of one round trains with the same settings (docs/api.md, "Changing a live task").
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_training", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("pending_training")
