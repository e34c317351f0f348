"""Alembic environment: keyplane always hands in an open connection (see store/migrate.py)."""

from __future__ import annotations

from alembic import context

from keyplane.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through keyplane.store.migrate.upgrade (or `keyplane migrate`)")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
