"""Schema migrations: a new store, an older store and a current one (which skips Alembic entirely)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from keyplane.logs import configure_logging
from keyplane.store import migrate
from keyplane.store.db import Database
from tests.conftest import downgrader


def test_head_revision_is_alembics_head() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert script.get_heads() == [migrate.head_revision()]


@pytest.mark.fresh_store
async def test_new_older_and_current_stores(
    settings_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyplane.store")
    settings = settings_factory()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, settings.database_schema)
    try:
        assert await migrate.current_revision(db) is None
        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        # One line for the whole upgrade, not Alembic's line per step (a first start's output stays short).
        assert _migration_lines(caplog) == [f"store schema migrated from an empty store to {migrate.head_revision()}"]
        caplog.clear()

        # A store left at an older revision is brought up to date.
        async with db.write_engine.connect() as conn:
            await conn.run_sync(downgrader(db, "0002"))
            await conn.commit()
        assert await migrate.current_revision(db) == "0002"
        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        async with db.read_engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert "alert_rules" in tables
        assert _migration_lines(caplog) == [f"store schema migrated from 0002 to {migrate.head_revision()}"]

        # A current store: nothing to run, so Alembic is not even called.
        def must_not_run(*_: Any) -> None:
            raise AssertionError("Alembic ran on a store that was already current")

        monkeypatch.setattr(migrate, "_upgrade", must_not_run)
        await migrate.upgrade(db)
    finally:
        await db.dispose()


def _migration_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "keyplane.store"]


def test_alembic_steps_are_not_logged_one_by_one() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        assert not logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO)
        assert logging.getLogger("keyplane.store").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
