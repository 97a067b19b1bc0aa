"""CHECK constraints on every status column

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 04:30:00.000000

Each ``status`` column accepts only the values of its enum in ``fedge.coordinator.states`` (the
values are written out here: a migration must not change when the code does). A database
holding any other value fails this upgrade, on PostgreSQL when the constraint is validated,
on SQLite when batch mode copies the rows into the rebuilt table; nothing is changed then.

SQLite rebuilds each table (batch mode). ``migrations/env.py`` turns SQLite's foreign-key
enforcement off around migrations, as the rebuild needs: dropping a referenced table with
enforcement on would cascade the delete into its children. Afterwards every reference is
checked (``PRAGMA foreign_key_check``).
"""

from collections.abc import Sequence

from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES: dict[str, tuple[str, ...]] = {
    'tasks': ('draft', 'running', 'paused', 'completed', 'cancelled', 'failed'),
    'rounds': ('open', 'aggregating', 'closed', 'failed'),
    'devices': ('active', 'revoked'),
    'assignments': ('assigned', 'downloaded', 'uploaded', 'dropped', 'cancelled'),
    'updates': ('accepted', 'applied', 'rejected'),
}


def _check_references() -> None:
    bind = op.get_bind()
    if bind.dialect.name != 'sqlite':
        return
    broken = bind.exec_driver_sql('PRAGMA foreign_key_check').fetchall()
    if broken:
        raise RuntimeError(f'foreign keys broken by the table rebuild: {broken}')


def upgrade() -> None:
    for table, values in STATUSES.items():
        allowed = ', '.join(f"'{value}'" for value in values)
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_check_constraint(op.f(f'ck_{table}_status'), f'status IN ({allowed})')
    _check_references()


def downgrade() -> None:
    for table in reversed(STATUSES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(op.f(f'ck_{table}_status'), type_='check')
    _check_references()
