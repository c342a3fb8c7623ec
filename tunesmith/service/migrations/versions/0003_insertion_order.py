"""files.seq, jobs.seq: an insertion-ordered key for the list endpoints

created_at has one-second resolution, so objects made in the same second came back in the order
of their random ids, and an `after` cursor could skip or repeat them as new ones arrived. seq is
the order of insertion: a PostgreSQL sequence (column default), on SQLite max(seq) + 1 inside the
INSERT (its single writer makes that atomic). Existing rows are numbered by (created_at, id).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

TABLES = ('files', 'jobs')


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == 'postgresql'
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('seq', sa.BigInteger(), nullable=True))
        ids = [r[0] for r in bind.execute(sa.text(f'SELECT id FROM {table} ORDER BY created_at, id'))]
        for n, id_ in enumerate(ids, 1):
            bind.execute(sa.text(f'UPDATE {table} SET seq = :n WHERE id = :id'), {'n': n, 'id': id_})
        if postgres:
            op.execute(f'CREATE SEQUENCE {table}_seq_seq OWNED BY {table}.seq START WITH {len(ids) + 1}')
            op.execute(f"ALTER TABLE {table} ALTER COLUMN seq SET DEFAULT nextval('{table}_seq_seq')")
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('seq', existing_type=sa.BigInteger(), nullable=False)
            batch_op.create_index(f'ix_{table}_seq', ['seq'], unique=True)


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_seq')
            batch_op.drop_column('seq')
        if op.get_bind().dialect.name == 'postgresql':
            op.execute(f'DROP SEQUENCE IF EXISTS {table}_seq_seq')
