"""blobs and blob_chunks: the blob store in the database (FEDGE_BLOB_URL=database)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 20:30:00.000000

Empty tables whatever the blob backend, so that switching to the database store needs no
other schema. A blob is one ``blobs`` row and ``num_chunks`` rows of at most 1 MiB in
``blob_chunks``. On PostgreSQL the chunk bytes are stored out of line without compression
(``STORAGE EXTERNAL``): model weights and quantized updates hardly compress, and pglz would
only spend CPU on every write.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fedge.coordinator.db


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('num_chunks', sa.Integer(), nullable=False),
    sa.Column('written_at', fedge.coordinator.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_blobs'))
    )
    op.create_table('blob_chunks',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['digest'], ['blobs.digest'], name=op.f('fk_blob_chunks_digest_blobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('digest', 'seq', name=op.f('pk_blob_chunks'))
    )
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL')


def downgrade() -> None:
    op.drop_table('blob_chunks')
    op.drop_table('blobs')
