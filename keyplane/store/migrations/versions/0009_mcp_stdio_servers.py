"""stdio MCP servers: a server's command (argv), its sealed environment and its working directory

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 21:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing servers are HTTP ones: null command, no environment; nothing to backfill.
    with op.batch_alter_table('mcp_servers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('command', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('env_sealed', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('env_names', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('cwd', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('mcp_servers', schema=None) as batch_op:
        batch_op.drop_column('cwd')
        batch_op.drop_column('env_names')
        batch_op.drop_column('env_sealed')
        batch_op.drop_column('command')
