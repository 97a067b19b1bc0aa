"""model_versions: the broadcast model and the compressed delta devices download

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 10:00:00.000000

Nullable, no backfill: a version without a broadcast digest broadcasts its true model (the
dense download policy, and every version written before compressed downloads existed) and
has no delta, so a device behind it gets the full model.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('broadcast_digest', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('broadcast_size', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('delta_digest', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('delta_size', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('delta_size')
        batch_op.drop_column('delta_digest')
        batch_op.drop_column('broadcast_size')
        batch_op.drop_column('broadcast_digest')
