"""keyed audit chain: a hash rule per entry, and each organization's legacy boundary

Entries written before this migration keep their plain SHA-256 hashes (``hash_version`` 1) and keep
verifying under that rule up to ``audit_legacy_seq``, the head each organization had when it ran;
every later entry is keyed (version 2). The first server start after it signs a checkpoint of every
head, pinning the legacy prefix outside the database.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hash_version', sa.Integer(), server_default='1', nullable=False))
    with op.batch_alter_table('organizations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('audit_legacy_seq', sa.Integer(), server_default='0', nullable=False))
    # Backfill: every existing entry is legacy (the server default above), up to each current head.
    op.execute("UPDATE organizations SET audit_legacy_seq = audit_seq")


def downgrade() -> None:
    with op.batch_alter_table('organizations', schema=None) as batch_op:
        batch_op.drop_column('audit_legacy_seq')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_column('hash_version')
