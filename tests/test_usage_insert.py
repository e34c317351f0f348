"""The usage writer's own statements (several rows per INSERT on SQLite, the driver's executemany on
PostgreSQL) store exactly the rows they are given, whatever the values."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from keyplane.app import KeyplaneApp
from keyplane.domain import usage_row
from keyplane.runtime.usage_buffer import store_unreachable
from keyplane.services.usage import event_to_dict
from keyplane.store import rollups
from keyplane.store.models import UsageEvent


def _unusual_rows(org_id: str) -> list[tuple[Any, ...]]:
    """63 rows (32 + 16 + 8 + 4 + 2 + 1: every statement size on SQLite), each unlike its neighbours."""
    base = datetime(2026, 11, 24, 8, 0, 0, tzinfo=UTC)
    rows = []
    for i in range(63):
        rows.append((
            org_id, f"vk_{i % 5}", None if i % 2 else f"vk_parent_{i % 3}", None if i % 7 == 0 else "prov-ü",
            None if i % 3 == 0 else f"模型-{i}-é", "центр" if i % 4 else None, None, "/v1/chat/completions",
            "srv" if i % 9 == 0 else None, "tööl" if i % 9 == 0 else None, (200, 429, 502, 404)[i % 4],
            ("ok", "rate_limited", "upstream_error", "not_found")[i % 4], "tools/call" if i % 9 == 0 else None,
            2**31 - 1 if i == 5 else i * 1000, 0 if i % 2 else 7, i % 3, 2**31 - 1 if i == 6 else 2, i * 1e-7,
            1e9 if i == 11 else i * 3.5, None if i % 5 == 0 else "2001:db8::1",
            usage_row.us_of(base) + i * 123_457 + (999_999 if i == 62 else 0),
        ))
    return rows


async def test_a_batch_of_unusual_rows_is_stored_as_given(app: KeyplaneApp) -> None:
    kp = app.kp
    org_id = "org_unusual"
    rows = _unusual_rows(org_id)
    await kp.usage.insert(rows)

    def read(s: Any) -> list[dict[str, Any]]:
        events = s.execute(select(UsageEvent).where(UsageEvent.org_id == org_id).order_by(UsageEvent.pk)).scalars()
        return [event_to_dict(e) for e in events]

    stored = await kp.db.run_read(read)
    assert len(stored) == len(rows)
    for got, row in zip(stored, rows, strict=True):
        want = usage_row.as_dict(row)
        want.pop("org_id")
        assert got == want
    totals = await kp.usage.totals(org_id, 0, 2**40, "model")
    assert sum(t.requests for t in totals.values()) == len(rows)
    assert sum(t.input_tokens for t in totals.values()) == sum(r[usage_row.INPUT_TOKENS] for r in rows)
    day = await kp.db.run_read(lambda s: s.execute(text(
        f"SELECT SUM(requests), SUM(cache_read_tokens) FROM {rollups.TABLES['d']} WHERE org_id = :o"),
        {"o": org_id}).one())
    assert tuple(day) == (len(rows), sum(r[usage_row.CACHE_READ_TOKENS] for r in rows))


async def test_the_raw_sqlite_write_rolls_back_and_says_what_went_wrong(app: KeyplaneApp) -> None:
    """A failure inside ``run_dbapi_write`` leaves nothing behind and comes out as SQLAlchemy's error, so the
    usage buffer tells a busy store (keep the batch) from a refused row (split the batch) as before."""
    db = app.kp.db
    if not db.is_sqlite:
        pytest.skip("SQLite's raw write path")

    def half_then_busy(cursor: Any) -> None:
        cursor.execute("INSERT INTO usage_events (endpoint, status, code, input_tokens, output_tokens, cost_usd, "
                       "latency_ms, time) VALUES ('/x', 200, 'ok', 0, 0, 0.0, 1.0, '2026-11-24 08:00:00.000000')")
        assert cursor.execute("SELECT COUNT(*) FROM usage_events WHERE endpoint = '/x'").fetchone()[0] == 1
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(OperationalError) as raised:
        await db.run_dbapi_write(half_then_busy)
    assert store_unreachable(raised.value)
    left = await db.run_read(lambda s: s.execute(text("SELECT COUNT(*) FROM usage_events WHERE endpoint = '/x'"))
                             .scalar())
    assert left == 0
    assert await db.run_dbapi_write(lambda cursor: cursor.execute("SELECT 1").fetchone()[0]) == 1
