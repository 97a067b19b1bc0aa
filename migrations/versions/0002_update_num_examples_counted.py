"""updates.num_examples_counted: the examples that count for an update's weight

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000

Nullable, no backfill: rows written before it count their claim capped by the task's
``max_num_examples`` (fedge.coordinator.engine.examples.stored_count).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('updates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('num_examples_counted', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('updates', schema=None) as batch_op:
        batch_op.drop_column('num_examples_counted')
