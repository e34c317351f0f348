"""alert rules remember how their last webhook delivery went

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No backfill: no delivery before this revision left a record (only a log line), so "none yet" is true.
    with op.batch_alter_table('alert_rules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_delivery_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('last_delivery_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_delivery_attempts', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('last_delivery_error', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('alert_rules', schema=None) as batch_op:
        batch_op.drop_column('last_delivery_error')
        batch_op.drop_column('last_delivery_attempts')
        batch_op.drop_column('last_delivery_at')
        batch_op.drop_column('last_delivery_status')
