"""model_versions.pruned_at: the time the retention policy deleted a version's blobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 20:30:00.000000

Nullable, no backfill: every existing version keeps its blobs. A pruned version keeps its row
(number, digests, metrics) so the API can say it was pruned (410 ``version_pruned``) and the
task's history stays readable; only its blobs go (docs/operations.md, "Retention and garbage
collection").
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fedge.coordinator.db


revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pruned_at", fedge.coordinator.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("pruned_at")
