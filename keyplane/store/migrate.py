"""Apply Alembic migrations programmatically (``keyplane serve`` does this on start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from keyplane.store.db import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number: every keyplane process takes this PostgreSQL advisory lock before migrating.
_PG_MIGRATION_LOCK = 0x6B657970


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def upgrade(db: Database) -> None:
    async with db.write_engine.connect() as conn:
        if not db.is_sqlite:
            if db.schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
            # Several processes may start at once: one migrates, the others wait and find it done.
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            await conn.commit()
        try:
            await conn.run_sync(_upgrade, db.url)
            await conn.commit()
        finally:
            if not db.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                await conn.commit()
