"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 07:21:47.084404
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('organizations',
    sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('audit_seq', sa.Integer(), nullable=False),
    sa.Column('audit_head', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('audit_events',
    sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('time', sa.String(length=40), nullable=False),
    sa.Column('principal', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('target', sa.String(length=200), nullable=False),
    sa.Column('details', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('org_id', 'seq', name='uq_audit_events_org_seq')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_action'), ['action'], unique=False)
        batch_op.create_index('ix_audit_events_org_time', ['org_id', 'time'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_principal'), ['principal'], unique=False)

    op.create_table('limit_profiles',
    sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.String(length=500), nullable=True),
    sa.Column('requests_per_minute', sa.Integer(), nullable=True),
    sa.Column('tokens_per_minute', sa.Integer(), nullable=True),
    sa.Column('cost_per_day_usd', sa.Float(), nullable=True),
    sa.Column('budget_per_month_usd', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('org_id', 'name', name='uq_limit_profiles_org_name')
    )
    with op.batch_alter_table('limit_profiles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_limit_profiles_org_id'), ['org_id'], unique=False)

    op.create_table('service_accounts',
    sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('description', sa.String(length=500), nullable=True),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('token_mask', sa.String(length=40), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    with op.batch_alter_table('service_accounts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_service_accounts_org_id'), ['org_id'], unique=False)

    op.create_table('virtual_keys',
    sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('org_id', sa.String(length=40), nullable=False),
    sa.Column('parent_id', sa.String(length=40), nullable=True),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('key_mask', sa.String(length=40), nullable=False),
    sa.Column('previous_key_hash', sa.String(length=64), nullable=True),
    sa.Column('previous_valid_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ip_allowlist', sa.JSON(), nullable=False),
    sa.Column('limit_profile_id', sa.String(length=40), nullable=True),
    sa.Column('cost_center', sa.String(length=100), nullable=True),
    sa.Column('environment', sa.String(length=100), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('allowed_models', sa.JSON(), nullable=False),
    sa.Column('require_signature', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('request_count', sa.Integer(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['limit_profile_id'], ['limit_profiles.id'], ),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('virtual_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_virtual_keys_cost_center'), ['cost_center'], unique=False)
        batch_op.create_index(batch_op.f('ix_virtual_keys_environment'), ['environment'], unique=False)
        batch_op.create_index(batch_op.f('ix_virtual_keys_org_id'), ['org_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_virtual_keys_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_virtual_keys_previous_key_hash'), ['previous_key_hash'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('virtual_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_virtual_keys_previous_key_hash'))
        batch_op.drop_index(batch_op.f('ix_virtual_keys_parent_id'))
        batch_op.drop_index(batch_op.f('ix_virtual_keys_org_id'))
        batch_op.drop_index(batch_op.f('ix_virtual_keys_environment'))
        batch_op.drop_index(batch_op.f('ix_virtual_keys_cost_center'))

    op.drop_table('virtual_keys')
    with op.batch_alter_table('service_accounts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_service_accounts_org_id'))

    op.drop_table('service_accounts')
    with op.batch_alter_table('limit_profiles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_limit_profiles_org_id'))

    op.drop_table('limit_profiles')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_principal'))
        batch_op.drop_index('ix_audit_events_org_time')
        batch_op.drop_index(batch_op.f('ix_audit_events_action'))

    op.drop_table('audit_events')
    op.drop_table('organizations')
