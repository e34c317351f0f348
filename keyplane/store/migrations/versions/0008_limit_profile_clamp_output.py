"""limit profiles: clamp_output

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 21:30:00

A budgeted request whose answer could cost more than the budget has left gets its max_tokens lowered to
what the budget covers (clamp_output true) or is refused (false). Existing profiles clamp: the server
default true is what the gateway now does for every profile that does not say otherwise.
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('limit_profiles') as batch_op:
        batch_op.add_column(sa.Column('clamp_output', sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table('limit_profiles') as batch_op:
        batch_op.drop_column('clamp_output')
