"""usage rollups (per minute/hour/day), backfilled from the usage events already stored

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from keyplane.domain import latency_sketch
from keyplane.store import rollups

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

BACKFILL_PAGE = 20_000


def upgrade() -> None:
    for table in rollups.TABLES.values():
        op.create_table(table,
        sa.Column('org_id', sa.String(length=40), nullable=False),
        sa.Column('bucket', sa.BigInteger(), nullable=False),
        sa.Column('key_id', sa.String(length=40), nullable=False),
        sa.Column('parent_id', sa.String(length=40), nullable=False),
        sa.Column('provider', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('cost_center', sa.String(length=100), nullable=False),
        sa.Column('environment', sa.String(length=100), nullable=False),
        sa.Column('endpoint', sa.String(length=100), nullable=False),
        sa.Column('mcp_server', sa.String(length=64), nullable=False),
        sa.Column('tool', sa.String(length=128), nullable=False),
        sa.Column('status_class', sa.String(length=3), nullable=False),
        sa.Column('refusal_code', sa.String(length=40), nullable=False),
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
        # The dimensions are the key; SQLite keeps the rows in key order (WITHOUT ROWID).
        sa.PrimaryKeyConstraint('org_id', 'bucket', 'key_id', 'parent_id', 'provider', 'model', 'cost_center',
                                'environment', 'endpoint', 'mcp_server', 'tool', 'status_class', 'refusal_code',
                                name=f'pk_{table}'),
        sqlite_with_rowid=False,
        )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(f'ix_{table}_key', ['key_id', 'bucket'], unique=False)
            batch_op.create_index(f'ix_{table}_parent', ['parent_id', 'bucket'], unique=False)
            batch_op.create_index(f'ix_{table}_bucket', ['bucket'], unique=False)
    _backfill(op.get_bind())


def _backfill(conn: sa.engine.Connection) -> None:
    """Every stored event into the keyed rollups (the organization ones arrive with 0011, backfilled
    from these), a page at a time (memory stays bounded)."""
    last: int | None = 0
    while last is not None:
        last = rollups.backfill_page(conn, last, BACKFILL_PAGE, tags=rollups.TABLES)


def downgrade() -> None:
    for table in rollups.TABLES.values():
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_bucket')
            batch_op.drop_index(f'ix_{table}_parent')
            batch_op.drop_index(f'ix_{table}_key')
        op.drop_table(table)
