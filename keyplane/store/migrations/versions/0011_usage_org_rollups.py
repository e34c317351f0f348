"""usage rollups per organization (hour, day) without the key dimensions, backfilled from the keyed
rollups; the unused (parent_id, bucket) indexes of the keyed rollups go

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

from keyplane.domain import latency_sketch
from keyplane.store import rollups

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in rollups.TABLES.values():
        # Nothing reads the rollups by parent key: a key's traffic is its key ids (virtual_keys.parent_id),
        # then (key_id, bucket). One index less to update per upserted row.
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_parent')
    for grain in ('h', 'd'):  # the minute ones arrive with 0012
        table = rollups.ORG_TABLES[grain]
        op.create_table(table,
        sa.Column('org_id', sa.String(length=40), nullable=False),
        sa.Column('bucket', sa.BigInteger(), nullable=False),
        sa.Column('provider', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('cost_center', sa.String(length=100), nullable=False),
        sa.Column('environment', sa.String(length=100), nullable=False),
        sa.Column('endpoint', sa.String(length=100), nullable=False),
        sa.Column('mcp_server', sa.String(length=64), nullable=False),
        sa.Column('tool', sa.String(length=128), nullable=False),
        sa.Column('status_class', sa.String(length=3), nullable=False),
        sa.Column('requests', sa.BigInteger(), nullable=False),
        sa.Column('errors', sa.BigInteger(), nullable=False),
        sa.Column('refused', sa.BigInteger(), nullable=False),
        sa.Column('failed', sa.BigInteger(), nullable=False),
        sa.Column('input_tokens', sa.BigInteger(), nullable=False),
        sa.Column('output_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cache_write_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cache_read_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cost_usd', sa.Float(), nullable=False),
        sa.Column('latency_ms_sum', sa.Float(), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=False) for c in latency_sketch.COLUMNS),
        sa.PrimaryKeyConstraint(*rollups.ORG_UNIQUE, name=f'pk_{table}'),
        sqlite_with_rowid=False,
        )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(f'ix_{table}_bucket', ['bucket'], unique=False)
        # The keyed rows summed without their key dimensions: one statement in the store, no event re-read.
        op.execute(rollups.org_backfill_sql(grain))


def downgrade() -> None:
    for table in (rollups.ORG_TABLES['h'], rollups.ORG_TABLES['d']):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_bucket')
        op.drop_table(table)
    for table in rollups.TABLES.values():
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(f'ix_{table}_parent', ['parent_id', 'bucket'], unique=False)
