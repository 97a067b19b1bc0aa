"""task targeting: task requirements, device tags and capability reports, declines

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 23:00:00.000000

- ``tasks.requirements``: what a device must offer to be given the task's work (``{}``: any
  device), docs/rounds.md "Eligibility";
- ``devices.tags`` (``[]``), ``devices.capabilities_at`` (when the device last reported its
  capabilities; null: never) and ``devices.num_declined``;
- ``assignments.decline_reason``/``decline_detail``: a device's signed decline of an
  assignment (the assignment is then ``cancelled``), counted in ``rounds.num_declined``.

Existing rows get the defaults: no requirements, no tags, nothing declined.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fedge.coordinator.db


revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("requirements", sa.JSON(), server_default="{}", nullable=False)
        )
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("num_declined", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "capabilities_at", fedge.coordinator.db.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.add_column(sa.Column("tags", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(
            sa.Column("num_declined", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decline_reason", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("decline_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("decline_detail")
        batch_op.drop_column("decline_reason")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("num_declined")
        batch_op.drop_column("tags")
        batch_op.drop_column("capabilities_at")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("num_declined")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("requirements")
