"""MCP servers behind keys: the mcp_servers table, a key's mcp_servers grant, MCP fields on usage events
and alert rules

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 20:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('mcp_servers',
    sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.String(length=500), nullable=True),
    sa.Column('transport', sa.String(length=16), nullable=False),
    sa.Column('url', sa.String(length=500), nullable=False),
    sa.Column('headers_sealed', sa.Text(), nullable=True),
    sa.Column('header_names', sa.JSON(), nullable=False),
    sa.Column('tool_scopes', sa.JSON(), nullable=False),
    sa.Column('timeout_seconds', sa.Float(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('org_id', 'name', name='uq_mcp_servers_org_name')
    )
    with op.batch_alter_table('mcp_servers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mcp_servers_org_id'), ['org_id'], unique=False)
    # Existing keys keep their meaning: null grants no MCP server, so no backfill is needed.
    with op.batch_alter_table('virtual_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mcp_servers', sa.JSON(), nullable=True))
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mcp_server', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('mcp_method', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('tool', sa.String(length=128), nullable=True))
    with op.batch_alter_table('alert_rules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mcp_server', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('alert_rules', schema=None) as batch_op:
        batch_op.drop_column('mcp_server')
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_column('tool')
        batch_op.drop_column('mcp_method')
        batch_op.drop_column('mcp_server')
    with op.batch_alter_table('virtual_keys', schema=None) as batch_op:
        batch_op.drop_column('mcp_servers')
    with op.batch_alter_table('mcp_servers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mcp_servers_org_id'))
    op.drop_table('mcp_servers')
