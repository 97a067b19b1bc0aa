"""Secure aggregation: the round state of secure-aggregation rounds

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 05:00:00.000000

- ``secagg_rounds``: one row per sync round run with secure aggregation (its public
  parameters, phase and phase deadline, and the unmasked result);
- ``secagg_members``: one row per selected device (cohort index, the messages it sent and was
  sent, the phase it reached). docs/secure-aggregation.md.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fedge.coordinator.db import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secagg_rounds",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("seed", sa.LargeBinary(), nullable=False),
        sa.Column("cohort", sa.Integer(), nullable=False),
        sa.Column("degree", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("k", sa.BigInteger(), nullable=False),
        sa.Column("grid_bound", sa.Float(), nullable=False),
        sa.Column("grid_bits", sa.Integer(), nullable=False),
        sa.Column("support_kind", sa.String(length=16), nullable=False),
        sa.Column("support_version", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("phase_deadline_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("result_sum", sa.LargeBinary(), nullable=True),
        sa.Column("num_included", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["rounds.id"],
            name=op.f("fk_secagg_rounds_round_id_rounds"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name=op.f("fk_secagg_rounds_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("round_id", name=op.f("pk_secagg_rounds")),
    )
    with op.batch_alter_table("secagg_rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_secagg_rounds_task_id"), ["task_id"], unique=False)
    op.create_table(
        "secagg_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("cohort_index", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("phase_reached", sa.String(length=16), nullable=False),
        sa.Column("dropped", sa.Boolean(), nullable=False),
        sa.Column("advert", sa.LargeBinary(), nullable=True),
        sa.Column("shares_out", sa.LargeBinary(), nullable=True),
        sa.Column("shares_in", sa.LargeBinary(), nullable=True),
        sa.Column("masked", sa.LargeBinary(), nullable=True),
        sa.Column("unmask_request", sa.LargeBinary(), nullable=True),
        sa.Column("unmask_response", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["assignment_id"],
            ["assignments.id"],
            name=op.f("fk_secagg_members_assignment_id_assignments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_secagg_members_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["secagg_rounds.round_id"],
            name=op.f("fk_secagg_members_round_id_secagg_rounds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_members")),
        sa.UniqueConstraint("round_id", "cohort_index", name="uq_secagg_members_round_index"),
        sa.UniqueConstraint("round_id", "device_id", name="uq_secagg_members_round_device"),
    )
    with op.batch_alter_table("secagg_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_secagg_members_round_id"), ["round_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("secagg_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_secagg_members_round_id"))
    op.drop_table("secagg_members")
    with op.batch_alter_table("secagg_rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_secagg_rounds_task_id"))
    op.drop_table("secagg_rounds")
