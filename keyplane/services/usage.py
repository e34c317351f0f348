"""Usage events: batch inserts from the gateway, summaries and event listings for people and agents."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, insert, or_, select
from sqlalchemy.orm import Session

from keyplane.domain.errors import invalid_request
from keyplane.services.audit import parse_since
from keyplane.services.pagination import decode_cursor, page
from keyplane.services.principal import Principal
from keyplane.store.db import Database
from keyplane.store.models import UsageEvent

GROUPS = ("provider", "model", "cost_center", "environment", "key", "endpoint", "hour", "day")
MAX_SUMMARY_ROWS = 2_000_000


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)
    return round(sorted_values[index], 3)


def event_to_dict(e: UsageEvent) -> dict[str, Any]:
    return {
        "time": e.time, "key_id": e.key_id, "parent_id": e.parent_id, "provider": e.provider, "model": e.model,
        "endpoint": e.endpoint, "status": e.status, "code": e.code, "input_tokens": e.input_tokens,
        "output_tokens": e.output_tokens, "cost_usd": e.cost_usd, "latency_ms": e.latency_ms,
        "client_ip": e.client_ip, "cost_center": e.cost_center, "environment": e.environment,
    }


def _group_value(group_by: str, e: Any) -> str:
    if group_by == "hour":
        return e.time.astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
    if group_by == "day":
        return e.time.astimezone(UTC).strftime("%Y-%m-%d")
    value = getattr(e, "key_id" if group_by == "key" else group_by)
    return value if value is not None else "(none)"


_COLUMNS = ("org_id", "key_id", "parent_id", "provider", "model", "endpoint", "status", "code", "input_tokens",
            "output_tokens", "cost_usd", "latency_ms", "client_ip", "cost_center", "environment", "time")
_SQLITE_INSERT = (f"INSERT INTO usage_events ({', '.join(_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


def _sqlite_executemany(s: Session, batch: list[dict[str, Any]]) -> None:
    """The driver's executemany with plain tuples: ~10x cheaper than the ORM's bulk insert, which
    mattered at thousands of events a second (it showed as tail latency on the requests being served).
    Times are stored exactly as SQLAlchemy stores them on SQLite (naive UTC text)."""
    rows = []
    for event in batch:
        at = event["time"].astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append((*(event[c] for c in _COLUMNS[:-1]), at))
    s.connection().exec_driver_sql(_SQLITE_INSERT, rows)


class UsageService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, batch: list[dict[str, Any]]) -> None:
        if self.db.is_sqlite:
            await self.db.run_write(lambda s: _sqlite_executemany(s, batch))
        else:
            await self.db.run_write(lambda s: s.execute(insert(UsageEvent), batch))

    async def spent_so_far(self, bucket: str) -> tuple[float, float]:
        """USD spent today and this month (UTC) by a key and its direct sub-keys, from the store."""
        now = datetime.now(UTC)
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        cost_today = func.coalesce(func.sum(case((UsageEvent.time >= day_start, UsageEvent.cost_usd), else_=0.0)), 0.0)
        q = select(func.coalesce(func.sum(UsageEvent.cost_usd), 0.0), cost_today).where(
            or_(UsageEvent.key_id == bucket, UsageEvent.parent_id == bucket), UsageEvent.time >= month_start)
        async with self.db.read() as s:
            month, day = (await s.execute(q)).one()
        return float(day), float(month)

    async def summary(self, principal: Principal, *, since: str = "24h", group_by: str = "model",
                      key_id: str | None = None) -> dict[str, Any]:
        principal.require("usage:read")
        if group_by not in GROUPS:
            raise invalid_request(f"group_by is one of {', '.join(GROUPS)}", param="group_by")
        start = parse_since(since)
        columns = (UsageEvent.time, UsageEvent.provider, UsageEvent.model, UsageEvent.cost_center,
                   UsageEvent.environment, UsageEvent.key_id, UsageEvent.endpoint, UsageEvent.status,
                   UsageEvent.input_tokens, UsageEvent.output_tokens, UsageEvent.cost_usd, UsageEvent.latency_ms)
        q = select(*columns).where(UsageEvent.org_id == principal.org_id, UsageEvent.time >= start)
        if key_id:
            q = q.where(UsageEvent.key_id == key_id)
        groups: dict[str, dict[str, Any]] = defaultdict(lambda: {
            "requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "latencies": []})
        async with self.db.read() as s:
            result = await s.stream(q.limit(MAX_SUMMARY_ROWS))
            async for e in result:
                g = groups[_group_value(group_by, e)]
                g["requests"] += 1
                g["errors"] += e.status >= 400
                g["input_tokens"] += e.input_tokens
                g["output_tokens"] += e.output_tokens
                g["cost_usd"] += e.cost_usd
                g["latencies"].append(e.latency_ms)
        data = []
        for name, g in groups.items():
            lat = sorted(g.pop("latencies"))
            data.append({
                "group": name, "requests": g["requests"], "errors": g["errors"],
                "error_rate": round(g["errors"] / g["requests"], 4), "input_tokens": g["input_tokens"],
                "output_tokens": g["output_tokens"], "total_tokens": g["input_tokens"] + g["output_tokens"],
                "cost_usd": round(g["cost_usd"], 10), "p50_ms": _percentile(lat, 50), "p95_ms": _percentile(lat, 95),
            })
        key_order = (lambda d: d["group"]) if group_by in ("hour", "day") else (lambda d: (-d["requests"], d["group"]))
        data.sort(key=key_order)
        return {"since": start.isoformat(), "group_by": group_by, "data": data}

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
