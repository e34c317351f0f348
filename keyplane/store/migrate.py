"""Apply Alembic migrations programmatically (``keyplane serve`` does this on start)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from keyplane.store.db import Database

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number: every keyplane process takes this PostgreSQL advisory lock before migrating.
_PG_MIGRATION_LOCK = 0x6B657970

log = logging.getLogger("keyplane.store")


def head_revision() -> str:
    """The newest migration's revision. Each file in versions/ is named after its revision (``NNNN_…``);
    a test holds this equal to Alembic's own head."""
    return max(p.name.partition("_")[0] for p in (MIGRATIONS_DIR / "versions").glob("[0-9]*_*.py"))


async def current_revision(db: Database) -> str | None:
    """The store's schema revision, or None for a store that has none yet (or cannot be read)."""
    try:
        async with db.read_engine.connect() as conn:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one_or_none()
    except SQLAlchemyError:
        return None


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, url: str) -> None:
    from alembic import command

    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def upgrade(db: Database) -> None:
    before, head = await current_revision(db), head_revision()
    if before == head:
        # Already current: no lock, and no Alembic import (a third of a CLI command's start-up).
        return
    async with db.write_engine.connect() as conn:
        if not db.is_sqlite:
            if db.schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
            # Several processes may start at once: one migrates, the others wait and find it done.
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            await conn.commit()
        try:
            if not db.is_sqlite:
                before = await current_revision(db)  # another process may have migrated while we waited
            await conn.run_sync(_upgrade, db.url)
            await conn.commit()
            if before != head:
                log.info("store schema migrated from %s to %s", before or "an empty store", head)
        finally:
            if not db.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                await conn.commit()
