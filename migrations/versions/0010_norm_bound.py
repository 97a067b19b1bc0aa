"""Norm bound of updates: counters, per-update norm and the adaptive bound

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 23:00:00.000000

- ``devices.num_norm_clipped`` / ``num_norm_refused`` and ``rounds.num_clipped``: counters,
  nullable without a default (null counts as 0), so that no existing row needs a rewrite;
- ``updates.norm`` / ``clip_scale``: measured at aggregation, null for updates applied before;
- ``tasks.norm_bound``: the adaptive bound, null until a task with an adaptive bound
  aggregates (docs/robustness.md).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("num_norm_clipped", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("num_norm_refused", sa.Integer(), nullable=True))
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("num_clipped", sa.Integer(), nullable=True))
    with op.batch_alter_table("updates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("norm", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("clip_scale", sa.Float(), nullable=True))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("norm_bound", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("norm_bound")
    with op.batch_alter_table("updates", schema=None) as batch_op:
        batch_op.drop_column("clip_scale")
        batch_op.drop_column("norm")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("num_clipped")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("num_norm_refused")
        batch_op.drop_column("num_norm_clipped")
