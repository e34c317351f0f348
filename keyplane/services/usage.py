"""Usage events: batch inserts from the gateway, summaries and event listings for people and agents."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from keyplane.domain import latency_sketch, usage_row
from keyplane.domain.errors import invalid_request
from keyplane.services import traffic
from keyplane.services.audit import parse_since
from keyplane.services.keys import MAX_SUBKEY_DEPTH
from keyplane.services.pagination import decode_cursor, page
from keyplane.services.principal import Principal
from keyplane.store import rollups
from keyplane.store.db import Database, executemany_values
from keyplane.store.models import Organization, UsageEvent

GROUPS = ("provider", "model", "cost_center", "environment", "key", "endpoint", "mcp_server", "tool",
          "status_class", "hour", "day")


@dataclass(frozen=True)
class Retention:
    """Days each grain of rollups is kept (0: forever); see Settings and docs/configuration.md."""

    minute_days: int = 14
    hour_days: int = 400
    day_days: int = 0


def _group_label(group_by: str, value: Any) -> str:
    if group_by == "hour":
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:00Z")
    if group_by == "day":
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d")
    return value or "(none)"


def _prune_events(s: Session, org_id: str | None, cut: datetime, batch: int) -> int:
    """One bounded delete of an organization's events older than ``cut`` (``org_id`` None: anonymous
    refusals), found through the (org_id, time) index: never a read of the whole table."""
    owner = UsageEvent.org_id.is_(None) if org_id is None else UsageEvent.org_id == org_id
    old = select(UsageEvent.pk).where(owner, UsageEvent.time < cut).limit(batch).scalar_subquery()
    result = s.execute(delete(UsageEvent).where(UsageEvent.pk.in_(old)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def event_to_dict(e: UsageEvent) -> dict[str, Any]:
    return {
        "time": e.time, "key_id": e.key_id, "parent_id": e.parent_id, "provider": e.provider, "model": e.model,
        "endpoint": e.endpoint, "status": e.status, "code": e.code, "input_tokens": e.input_tokens,
        "output_tokens": e.output_tokens, "cache_write_tokens": e.cache_write_tokens,
        "cache_read_tokens": e.cache_read_tokens, "cost_usd": e.cost_usd, "latency_ms": e.latency_ms,
        "client_ip": e.client_ip, "cost_center": e.cost_center, "environment": e.environment,
        "mcp_server": e.mcp_server, "mcp_method": e.mcp_method, "tool": e.tool,
    }


# Rows (``keyplane.domain.usage_row``) go in as they are, their time as the text SQLAlchemy stores, several
# rows per INSERT: SQLite's work per statement (step, halt, reset) was a third of a row's insert.
_SQLITE_CHUNK = 32  # rows per INSERT (32 × 21 parameters): ``executemany_values``


@functools.cache
def _sqlite_insert(rows: int) -> str:
    values = "(" + ", ".join("?" for _ in usage_row.FIELDS) + ")"
    return f"INSERT INTO usage_events ({', '.join(usage_row.FIELDS)}) VALUES {', '.join([values] * rows)}"


@functools.cache
def _pg_insert(paramstyle: str) -> str:
    marks = ", ".join("?" if paramstyle == "qmark" else f"${i + 1}" for i in range(len(usage_row.FIELDS)))
    return f"INSERT INTO usage_events ({', '.join(usage_row.FIELDS)}) VALUES ({marks})"


def as_rows(batch: list[Any]) -> list[usage_row.Row]:
    """The batch as rows: the gateway's rows as they are, dict events converted."""
    return [e if type(e) is tuple else usage_row.row_of(e) for e in batch]


def _sqlite_insert_events(cursor: Any, rows: list[usage_row.Row]) -> None:
    """The events, through the driver's executemany: ~10x cheaper than the ORM's bulk insert, which
    mattered at thousands of events a second (it showed as tail latency on the requests being served).
    Times are stored exactly as SQLAlchemy stores them on SQLite (naive UTC text)."""
    stored_time = usage_row.StoredTime()
    t = usage_row.TIME
    stored = [r[:t] + (stored_time(r[t]),) for r in rows]  # noqa: RUF005 (cheaper than unpacking into a new tuple)
    executemany_values(cursor, _sqlite_insert, stored, _SQLITE_CHUNK)


class UsageService:
    """Writes usage batches (events and their rollups in one transaction) and reads summaries from
    the rollups. ``retention`` is the days each grain of rollups is kept (0: forever), so a summary
    that reaches further back than the minute rollups starts on the hour (and so on)."""

    def __init__(self, db: Database, retention: Retention | None = None, statement_timeout_ms: int = 0) -> None:
        self.db = db
        self.retention = retention or Retention()
        self.statement_timeout_ms = statement_timeout_ms

    def minute_floor(self, now: float | None = None) -> int | None:
        """The oldest minute rollup worth writing: retention deletes anything older at its next pass."""
        if not self.retention.minute_days:
            return None
        return int(time.time() if now is None else now) - self.retention.minute_days * 86400

    async def insert(self, batch: list[Any], now: float | None = None) -> None:
        """Store a batch of events and fold it into the rollups, in one transaction, off the event loop
        (SQLite: all of it in a worker thread; PostgreSQL: the aggregation in a thread, then async I/O).
        Events older than the minute rollups' retention (a backfill, a late flush) get no minute rows."""
        floor = self.minute_floor(now)
        if self.db.is_sqlite:
            def write(cursor: Any) -> None:
                rows = as_rows(batch)
                _sqlite_insert_events(cursor, rows)
                rollups.upsert_sqlite(cursor, rollups.aggregate_rows(rows, floor))

            await self.db.run_dbapi_write(write)
        else:
            def prepare() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
                rows = as_rows(batch)
                t, datetime_of = usage_row.TIME, usage_row.datetime_of
                return rollups.aggregate_rows(rows, floor), [r[:t] + (datetime_of(r[t]),) for r in rows]  # noqa: RUF005

            aggregated, events = await asyncio.to_thread(prepare)

            def write_pg(s: Session) -> None:
                # The driver's executemany of tuples (asyncpg: one prepared statement, binary rows), not the
                # ORM's insert of dicts, which cost ~100 µs of CPU per event.
                conn = s.connection()
                conn.exec_driver_sql(_pg_insert(conn.dialect.paramstyle), events)
                rollups.upsert(conn, aggregated)

            await self.db.run_write(write_pg)

    async def spent_so_far(self, bucket: str) -> tuple[float, float]:
        """USD spent today and this month (UTC) by a key's traffic (with its sub-keys at any depth: they
        spend from its budget): one statement (``rollups.spend``: the sub-key walk and the day rollups'
        index-only range reads), whatever the history. On SQLite one worker-thread hop; on PostgreSQL no
        transaction and a pre-ping of one round trip (``Database.run_statement``): two round trips in all,
        where the walk, the read, BEGIN, COMMIT and a transactional ping took seven or eight."""
        now = datetime.now(UTC)
        month_start = int(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
        day_start = int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
        depth = MAX_SUBKEY_DEPTH if traffic.INCLUDE_SUB_KEYS else 0
        return await self.db.run_statement(lambda conn: rollups.spend(conn, bucket, depth, day_start, month_start))

    async def warm_spend_seed(self) -> None:
        """Run the seed statement once at start, for no key: on PostgreSQL its pool opens a connection and
        asyncpg prepares the statement now, not in a key's first budgeted request (~10 ms measured)."""
        await self.db.run_statement(lambda conn: rollups.spend(conn, "", 0, 0, 0))

    def window(self, since: str, now: float | None = None) -> tuple[int, int]:
        """``[start, end)`` in unix seconds on minute boundaries: what a summary ``since`` covers."""
        now = time.time() if now is None else now
        start = rollups.floor_to(int(parse_since(since).timestamp()), rollups.MINUTE)
        for days, width in ((self.retention.minute_days, rollups.HOUR), (self.retention.hour_days, rollups.DAY)):
            if days and start < now - days * 86400:
                start = rollups.floor_to(start, width)  # the finer rollups are gone that far back
        return start, rollups.floor_to(int(now), rollups.MINUTE) + rollups.MINUTE

    async def totals(self, org_id: str, start: int, end: int, group_by: str,
                     key_ids: Collection[str] | None = None) -> dict[Any, rollups.Totals]:
        """Rollup totals per group: the one read every summary (REST, CLI, MCP, dashboard) goes through.
        ``key_ids`` limits it to those keys (a key's traffic: ``traffic.key_ids``)."""
        timeout = self.statement_timeout_ms if not self.db.is_sqlite else 0

        def read(s: Session) -> dict[Any, rollups.Totals]:
            if timeout:
                s.execute(text(f"SET LOCAL statement_timeout = {int(timeout)}"))
            return rollups.grouped(s.connection(), org_id, start, end, group_by, key_ids,
                                   open_ended=end > time.time())

        return await self.db.run_read(read)

    async def summary(self, principal: Principal, *, since: str = "24h", group_by: str = "model",
                      key_id: str | None = None, include_sub_keys: bool = traffic.INCLUDE_SUB_KEYS,
                      key_ids: Collection[str] | None = None) -> dict[str, Any]:
        """Requests (served + refused + failed), tokens, cost and latency, grouped, from the rollups; with
        ``key_id``, that key's traffic as ``traffic.key_ids`` defines it (its sub-keys too unless
        ``include_sub_keys`` is off); ``key_ids`` limits it to exactly those keys."""
        principal.require("usage:read")
        if group_by not in GROUPS:
            raise invalid_request(f"group_by is one of {', '.join(GROUPS)}", param="group_by")
        start, end = self.window(since)
        traffic_ids: list[str] | None = None
        if key_id:
            async with self.db.read() as s:
                traffic_ids = await traffic.key_ids(s, principal.org_id, key_id, include_sub_keys)
            key_ids = {*traffic_ids, *(key_ids or ())}
        groups = await self.totals(principal.org_id, start, end, group_by, key_ids)
        data = []
        for name, g in groups.items():
            if not g.requests:
                continue
            lat = g.latency or []
            data.append({
                "group": _group_label(group_by, name), "requests": g.requests, "served": g.served,
                "refused": g.refused, "failed": g.failed, "errors": g.errors,
                "error_rate": round(g.errors / g.requests, 4), "refusal_rate": round(g.refused / g.requests, 4),
                "failure_rate": round(g.failed / g.requests, 4), "input_tokens": g.input_tokens,
                "output_tokens": g.output_tokens, "total_tokens": g.input_tokens + g.output_tokens,
                "cache_write_tokens": g.cache_write_tokens, "cache_read_tokens": g.cache_read_tokens,
                "cost_usd": round(g.cost_usd, 10), "p50_ms": latency_sketch.percentile(lat, 50),
                "p95_ms": latency_sketch.percentile(lat, 95),
            })
        key_order = (lambda d: d["group"]) if group_by in ("hour", "day") else (lambda d: (-d["requests"], d["group"]))
        data.sort(key=key_order)
        scope: dict[str, Any] = {}
        if key_id:
            scope = {"key_id": key_id, "include_sub_keys": include_sub_keys, "key_ids": traffic_ids}
        return {"since": datetime.fromtimestamp(start, UTC).isoformat(), "group_by": group_by, **scope,
                "data": data}

    async def prune(self, events_days: int, *, batch: int = 5_000, pause: float = 0.01) -> int:
        """Delete raw events and rollups past their retention, ``batch`` rows per transaction with a pause
        between, so the store's writer lock is never held for long. Returns how many rows went."""
        now = int(time.time())
        removed = 0
        if events_days:
            cut = datetime.fromtimestamp(now - events_days * 86400, UTC)
            orgs: list[str | None] = [None]
            orgs += await self.db.run_read(lambda s: list(s.execute(select(Organization.id)).scalars()))
            for org in orgs:
                while True:
                    n = await self.db.run_write(lambda s, o=org: _prune_events(s, o, cut, batch))
                    removed += n
                    if n < batch:
                        break
                    await asyncio.sleep(pause)
        for grain, days in (("m", self.retention.minute_days), ("h", self.retention.hour_days),
                            ("d", self.retention.day_days)):
            if not days:
                continue
            before = now - days * 86400
            for table in rollups.tables_of(grain):
                while True:
                    n = await self.db.run_write(
                        lambda s, t=table, b=before: rollups.prune(s.connection(), t, b, batch))
                    removed += n
                    if n == 0:
                        break
                    await asyncio.sleep(pause)
        return removed

    async def events(self, principal: Principal, *, since: str | None = None, key_id: str | None = None,
                     model: str | None = None, provider: str | None = None, status: int | None = None,
                     cursor: str | None = None, limit: int = 50) -> dict[str, Any]:
        principal.require("usage:read")
        q = select(UsageEvent).where(UsageEvent.org_id == principal.org_id)
        if since:
            q = q.where(UsageEvent.time >= parse_since(since))
        for column, value in ((UsageEvent.key_id, key_id), (UsageEvent.model, model),
                              (UsageEvent.provider, provider), (UsageEvent.status, status)):
            if value is not None:
                q = q.where(column == value)
        if cursor:
            q = q.where(UsageEvent.pk < decode_cursor(cursor))
        q = q.order_by(UsageEvent.pk.desc()).limit(limit + 1)
        async with self.db.read() as s:
            rows = list((await s.execute(q)).scalars())
        rows, next_cursor = page(rows, limit, lambda e: e.pk)
        return {"data": [event_to_dict(r) for r in rows], "next_cursor": next_cursor}
