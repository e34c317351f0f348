"""usage events: prompt-cache write and read tokens

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 20:40:00

Anthropic bills prompt-cache writes and reads at their own prices and OpenAI reports cached input
tokens; a usage event records both, as parts of its input_tokens. Existing events had no cache
tokens (the gateway did not read them): the server default 0 is their true value.
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_events') as batch_op:
        batch_op.add_column(sa.Column('cache_write_tokens', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('cache_read_tokens', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('usage_events') as batch_op:
        batch_op.drop_column('cache_read_tokens')
        batch_op.drop_column('cache_write_tokens')
