"""usage rollups per organization and minute without the key dimensions, backfilled from the keyed
minute rollups (the ragged edges of unfiltered summaries read them); the day rollups' key index
covers the cost (a budget seed reads the index alone)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

from keyplane.domain import latency_sketch
from keyplane.store import rollups

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

TABLE = 'usage_rollups_org_minute'


def upgrade() -> None:
    op.create_table(TABLE,
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
    sa.PrimaryKeyConstraint('org_id', 'bucket', 'provider', 'model', 'cost_center', 'environment', 'endpoint',
                            'mcp_server', 'tool', 'status_class', name=f'pk_{TABLE}'),
    sqlite_with_rowid=False,
    )
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.create_index(f'ix_{TABLE}_bucket', ['bucket'], unique=False)
    # The keyed minute rows summed without their key dimensions: one statement in the store.
    op.execute(rollups.org_backfill_sql('m'))
    _key_index(['key_id', 'bucket', 'cost_usd'])


def _key_index(columns: list[str]) -> None:
    with op.batch_alter_table('usage_rollups_day', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_rollups_day_key')
        batch_op.create_index('ix_usage_rollups_day_key', columns, unique=False)


def downgrade() -> None:
    _key_index(['key_id', 'bucket'])
    with op.batch_alter_table(TABLE, schema=None) as batch_op:
        batch_op.drop_index(f'ix_{TABLE}_bucket')
    op.drop_table(TABLE)
