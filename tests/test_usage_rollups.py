"""Summaries and budget seeds from the rollups say exactly what the raw usage events say.

Random batches of usage events go in through the gateway's own write path (``UsageService.insert``,
which writes the events and their rollups in one transaction); a summary for a random window and
group-by must then match what the stored raw events give: counts (served, refused, failed), tokens
(prompt-cache writes and reads too) and cost exactly (cost to float rounding), p50/p95 within the latency
sketch's stated error; so must a key's traffic (with its sub-keys at any depth), its budget seed, an
alert's counts (per MCP server too) and a recommendation's demand and refusals by code. On every
configured store.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from sqlalchemy import text as text_

from keyplane.domain import latency_sketch
from keyplane.domain.outcomes import outcome
from keyplane.services import traffic
from keyplane.services.principal import Principal
from keyplane.services.usage import GROUPS, Retention, UsageService
from keyplane.store import migrate, rollups
from keyplane.store.db import Database
from keyplane.store.models import Organization, UsageEvent, VirtualKey
from tests.conftest import BACKENDS, POSTGRES_URL, downgrader, drop_schema


@pytest.fixture(scope="module", params=[b for b in BACKENDS if b != "distributed"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[asyncio.Runner, Database]]:
    """One migrated store per backend for the whole module, driven by its own event loop."""
    runner = asyncio.Runner()
    schema = f"kp_test_{secrets.token_hex(6)}"
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('rollups') / 'kp.db'}")
    else:
        assert POSTGRES_URL
        db = Database(POSTGRES_URL, schema=schema)
    runner.run(migrate.upgrade(db))
    yield runner, db
    runner.run(db.dispose())
    if request.param != "sqlite":
        runner.run(drop_schema(schema))
    runner.close()


def _principal(org_id: str) -> Principal:
    return Principal(id="sa_test", name="test", org_id=org_id, scopes=frozenset({"usage:read"}))


_NOW = time.time()
_latency = st.one_of(st.floats(0, 3000, allow_nan=False), st.sampled_from([0.0, 0.99, 1.0, 1.26, 250.0, 400_000.0]))
_event = st.fixed_dictionaries({
    "offset": st.one_of(st.integers(0, 40 * 86400), st.sampled_from([0, 59, 60, 3599, 3600, 86399, 86400,
                                                                       7 * 86400, 30 * 86400 - 1, 30 * 86400])),
    "key": st.sampled_from(["a", "b", "c", "sub", "subsub", None]),
    "provider": st.sampled_from(["openai", "local", None]),
    "model": st.sampled_from(["gpt-4o-mini", "echo-1", None]),
    "endpoint": st.sampled_from(["/v1/chat/completions", "/v1/models"]),
    "status": st.sampled_from([200, 200, 201, 400, 401, 403, 404, 429, 500, 502]),
    "code": st.sampled_from(["rate_limited", "budget_exceeded", "forbidden"]),
    "input_tokens": st.integers(0, 5000),
    "output_tokens": st.integers(0, 5000),
    "cache_write_tokens": st.integers(0, 3000),
    "cache_read_tokens": st.integers(0, 3000),
    "mcp": st.sampled_from([None, ("files", "tools/call", "read"), ("files", "tools/call", "write"),
                            ("git", "tools/list", None)]),
    "cost_usd": st.one_of(st.just(0.0), st.floats(0, 2, allow_nan=False)),
    "latency_ms": _latency,
    "cost_center": st.sampled_from(["billing", "research", None]),
    "environment": st.sampled_from(["prod", None]),
})


# Key "sub" is a sub-key of "a", and "subsub" a sub-key of "sub": a's traffic is all three.
_PARENTS = {"sub": "a", "subsub": "sub"}


def _events(org: str, drawn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in drawn:
        key = f"key_{org}_{d['key']}" if d["key"] else None
        parent = _PARENTS.get(d["key"] or "")
        server, method, tool = d["mcp"] or (None, None, None)
        event = {
            "org_id": org, "key_id": key, "parent_id": f"key_{org}_{parent}" if parent else None,
            "provider": d["provider"], "model": d["model"], "endpoint": d["endpoint"], "status": d["status"],
            "code": "ok" if d["status"] < 400 else (d["code"] if outcome(d["status"]) == "refused" else "error"),
            "input_tokens": d["input_tokens"], "output_tokens": d["output_tokens"],
            "cache_write_tokens": d["cache_write_tokens"], "cache_read_tokens": d["cache_read_tokens"],
            "cost_usd": d["cost_usd"], "latency_ms": d["latency_ms"],
            "client_ip": "127.0.0.1", "cost_center": d["cost_center"], "environment": d["environment"],
            "time": datetime.fromtimestamp(_NOW - d["offset"], UTC),
        }
        if server is not None:  # the gateway's own events leave these out, MCP events carry them
            event.update(mcp_server=server, mcp_method=method, tool=tool)
        out.append(event)
    return out


async def _add_keys(db: Database, org: str) -> None:
    """The organization's keys, so that a key's traffic (``traffic.key_ids``) can be walked."""
    async with db.write() as s:
        s.add(Organization(id=org, name=org))
        for name in ("a", "b", "c", "sub", "subsub"):
            parent = _PARENTS.get(name)
            s.add(VirtualKey(id=f"key_{org}_{name}", org_id=org, parent_id=f"key_{org}_{parent}" if parent else None,
                             name=name, key_hash=secrets.token_hex(32), key_mask="kp_…", scopes=[],
                             created_by="test"))


def _label(group_by: str, e: UsageEvent) -> str:
    if group_by == "hour":
        return e.time.strftime("%Y-%m-%dT%H:00Z")
    if group_by == "day":
        return e.time.strftime("%Y-%m-%d")
    if group_by == "status_class":
        return rollups.status_class(e.status)
    value = getattr(e, "key_id" if group_by == "key" else group_by)
    return value if value is not None else "(none)"


def _exact_percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _assert_within_sketch_error(reported: float, exact: float) -> None:
    if exact < 1.0:
        assert reported == 0.5
    elif exact >= latency_sketch.representative(latency_sketch.BUCKETS - 1):
        assert reported == latency_sketch.representative(latency_sketch.BUCKETS - 1)
    else:
        assert abs(reported - exact) <= exact * latency_sketch.RELATIVE_ERROR + 1e-3, (reported, exact)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(_event, min_size=1, max_size=40), min_size=1, max_size=3),
    since=st.sampled_from(["1h", "24h", "7d", "30d", "45d", "90m"]),
    group_by=st.sampled_from(GROUPS),
    only=st.sampled_from([None, ("a",), ("a", "sub"), ("b", "c"), "traffic:a", "traffic:sub", "own:a"]),
    minute_retention=st.sampled_from([0, 14, 2]),
)
def test_rollup_summary_equals_raw_events(
    store: tuple[asyncio.Runner, Database], batches: list[list[dict[str, Any]]], since: str, group_by: str,
    only: tuple[str, ...] | str | None, minute_retention: int,
) -> None:
    runner, db = store
    org = secrets.token_hex(4)
    usage = UsageService(db, Retention(minute_days=minute_retention, hour_days=20))
    # A key's traffic as every surface asks for it (key_id: with its sub-keys at any depth, or not), or an
    # explicit set of keys.
    key_id: str | None = None
    include_sub_keys = True
    key_ids: set[str] | None = None
    if isinstance(only, str):
        how, name = only.split(":")
        key_id, include_sub_keys = f"key_{org}_{name}", how == "traffic"
        key_ids = {key_id} | ({f"key_{org}_{k}" for k, p in _PARENTS.items() if p == name or _PARENTS.get(p) == name}
                              if include_sub_keys else set())
    elif only is not None:
        key_ids = {f"key_{org}_{k}" for k in only}
    traffic_a = {f"key_{org}_{k}" for k in ("a", "sub", "subsub")}

    written = time.time()
    asked_at: list[datetime] = []  # just before the summary was asked for

    async def run() -> tuple[dict[str, Any], list[UsageEvent], tuple[float, float], Any]:
        await _add_keys(db, org)
        for batch in batches:  # several batches: the upserts must add up, not overwrite
            await usage.insert(_events(org, batch), now=written)
        asked_at.append(datetime.now(UTC))
        if key_id is not None:
            summary = await usage.summary(_principal(org), since=since, group_by=group_by, key_id=key_id,
                                          include_sub_keys=include_sub_keys)
        else:
            summary = await usage.summary(_principal(org), since=since, group_by=group_by, key_ids=key_ids)
        async with db.read() as s:
            raw = list((await s.execute(select(UsageEvent).where(UsageEvent.org_id == org))).scalars())
            assert set(await traffic.key_ids(s, org, f"key_{org}_a")) == traffic_a
        spent = await usage.spent_so_far(f"key_{org}_a")
        lo, hi = usage.window(since)

        def reads(s: Any) -> Any:
            conn = s.connection()
            # Every organization rollup table, whole: what the events say, however the summary went.
            whole = {table: conn.execute(text_(
                f"SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(refused), 0), COALESCE(SUM(failed), 0), "
                f"COALESCE(SUM(input_tokens + output_tokens + cache_write_tokens + cache_read_tokens), 0), "
                f"COALESCE(SUM(cost_usd), 0) FROM {table} WHERE org_id = :org"), {"org": org}).one()
                for table in rollups.ORG_TABLES.values()}
            return (rollups.per_bucket(conn, traffic_a, lo, hi), rollups.refusals(conn, traffic_a, lo, hi),
                    rollups.counts(conn, org, lo, hi), rollups.counts(conn, org, lo, hi, traffic_a),
                    rollups.counts(conn, org, lo, hi, None, "files"), whole)

        return summary, raw, spent, (lo, await db.run_read(reads))

    summary, raw, (spent_day, spent_month), (lo, (minutes, refusals, counts_org, counts_a, counts_files, whole)) = \
        runner.run(run())
    floor = usage.minute_floor(written)
    for table, (requests, refused, failed, tokens, cost) in whole.items():
        # The organization minute rows, like the keyed ones, hold only the minutes within retention.
        kept = [e for e in raw if table != rollups.ORG_TABLES["m"] or floor is None
                or rollups.floor_to(int(e.time.timestamp()), rollups.MINUTE) >= floor]
        assert (requests, refused, failed) == (len(kept), sum(outcome(e.status) == "refused" for e in kept),
                                               sum(outcome(e.status) == "failed" for e in kept)), table
        assert tokens == sum(e.input_tokens + e.output_tokens + e.cache_write_tokens + e.cache_read_tokens
                             for e in kept), table
        assert math.isclose(cost, sum(e.cost_usd for e in kept), abs_tol=1e-9), table
    if key_id is not None:
        assert summary["key_id"] == key_id and set(summary["key_ids"]) == key_ids
    start = datetime.fromisoformat(summary["since"])
    asked = asked_at[0] - timedelta(seconds=_since_seconds(since))
    # The window never starts later than asked (the summary computed it a little after asked_at), only
    # earlier to a whole bucket.
    assert start <= datetime.now(UTC) - timedelta(seconds=_since_seconds(since))
    # ... to the hour past the minute rollups' retention, to the day past the hour rollups'.
    age = datetime.now(UTC) - asked
    slack = timedelta(minutes=1)
    if minute_retention and age > timedelta(days=minute_retention):
        slack = timedelta(hours=1)
    if age > timedelta(days=20):
        slack = timedelta(days=1)
    assert asked - start < slack
    fields = ("requests", "served", "refused", "failed", "errors", "input_tokens", "output_tokens",
              "cache_write_tokens", "cache_read_tokens")
    expected: dict[str, dict[str, Any]] = defaultdict(lambda: {**dict.fromkeys(fields, 0), "cost_usd": 0.0, "lat": []})
    for e in raw:
        if e.time < start or (key_ids is not None and e.key_id not in key_ids):
            continue
        g = expected[_label(group_by, e)]
        g["requests"] += 1
        g[outcome(e.status)] += 1
        g["errors"] += e.status >= 400
        g["input_tokens"] += e.input_tokens
        g["output_tokens"] += e.output_tokens
        g["cache_write_tokens"] += e.cache_write_tokens
        g["cache_read_tokens"] += e.cache_read_tokens
        g["cost_usd"] += e.cost_usd
        g["lat"].append(e.latency_ms)
    got = {row["group"]: row for row in summary["data"]}
    assert set(got) == set(expected)
    for name, want in expected.items():
        row = got[name]
        for field in fields:
            assert row[field] == want[field], (name, field)
        assert row["error_rate"] == round(want["errors"] / want["requests"], 4)
        assert row["refusal_rate"] == round(want["refused"] / want["requests"], 4)
        assert row["failure_rate"] == round(want["failed"] / want["requests"], 4)
        assert math.isclose(row["cost_usd"], want["cost_usd"], rel_tol=1e-9, abs_tol=1e-9)
        _assert_within_sketch_error(row["p50_ms"], _exact_percentile(want["lat"], 50))
        _assert_within_sketch_error(row["p95_ms"], _exact_percentile(want["lat"], 95))

    # The budget seed: key a's traffic (its sub-key and the sub-key's own sub-key), today and this month
    # (UTC), from the day rollups.
    now = datetime.now(UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    mine = [e for e in raw if e.key_id in traffic_a]
    assert math.isclose(spent_month, sum(e.cost_usd for e in mine if e.time >= month_start), abs_tol=1e-9)
    assert math.isclose(spent_day, sum(e.cost_usd for e in mine if e.time >= day_start), abs_tol=1e-9)

    # Alerts (an organization's, a key's traffic's, one MCP server's) and recommendations (demand per
    # minute without refusals, refusals by code) over the same window, from the minute rollups.
    window = [e for e in raw if e.time.timestamp() >= lo]
    assert counts_org == (len(window), sum(e.status >= 400 for e in window))
    in_a = [e for e in window if e.key_id in traffic_a]
    assert counts_a == (len(in_a), sum(e.status >= 400 for e in in_a))
    files = [e for e in window if e.mcp_server == "files"]
    assert counts_files == (len(files), sum(e.status >= 400 for e in files))
    refused_by_code: dict[str, int] = defaultdict(int)
    demand: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    cost_by_minute: dict[int, float] = defaultdict(float)
    # Minutes past the minute rollups' retention are never written (retention would delete them).
    kept = usage.minute_floor(written)
    for e in in_a:
        if kept is not None and rollups.floor_to(int(e.time.timestamp()), rollups.MINUTE) < kept:
            continue
        if outcome(e.status) == "refused":
            refused_by_code[e.code] += 1
            continue
        minute = rollups.floor_to(int(e.time.timestamp()), rollups.MINUTE)
        demand[minute][0] += 1
        demand[minute][1] += outcome(e.status) == "failed"
        demand[minute][2] += e.input_tokens + e.output_tokens
        cost_by_minute[minute] += e.cost_usd
    assert refusals == refused_by_code
    assert [m[:4] for m in minutes] == [(b, *demand[b]) for b in sorted(demand)]
    for bucket, *_rest, cost in minutes:
        assert math.isclose(cost, cost_by_minute[bucket], abs_tol=1e-9)


def _since_seconds(since: str) -> int:
    return int(since[:-1]) * {"m": 60, "h": 3600, "d": 86400}[since[-1]]


def test_cover_is_exact_and_coarse() -> None:
    """The window decomposition covers every minute once, with at most two ragged edges per grain."""
    for start, end in [(0, 60), (60, 7200), (59 * 60, 3 * 86400 + 120), (86400, 2 * 86400), (120, 120)]:
        parts = rollups.cover(start, end)
        minutes = sorted(m for grain, lo, hi in parts for m in range(lo, hi, 60))
        assert minutes == list(range(start, end, 60))
        for grain, lo, hi in parts:
            width = rollups.GRAINS[grain]
            assert lo % width == 0 and hi % width == 0
        assert sum(1 for g, *_ in parts if g == "m") <= 2 and sum(1 for g, *_ in parts if g == "h") <= 2


def test_latency_sketch_error_bound() -> None:
    for x in [1.0, 1.5, 2.0, 9.99, 100.0, 1234.5, 99_999.0, 200_000.0]:
        reported = latency_sketch.representative(latency_sketch.bucket_of(x))
        assert abs(reported - x) <= x * latency_sketch.RELATIVE_ERROR + 1e-9


@pytest.mark.fresh_store
async def test_migration_backfills_rollups_from_stored_events(settings_factory: Any) -> None:
    """A store with usage events from before the rollups: migration 0010 folds every one of them in, with
    their outcomes, refusal codes, prompt-cache tokens and MCP servers and tools."""

    settings = settings_factory()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, settings.database_schema)
    try:
        await migrate.upgrade(db)

        async with db.write_engine.connect() as conn:
            await conn.run_sync(downgrader(db, "0009"))
            await conn.commit()
        now = datetime.now(UTC)
        stored = [{"org_id": "org_old", "key_id": "key_old", "parent_id": None, "provider": "openai",
                   "model": "gpt-4o-mini", "endpoint": "/v1/chat/completions",
                   "status": 200 if i % 5 else (500 if i % 10 else 429),
                   "code": "ok" if i % 5 else ("upstream_error" if i % 10 else "rate_limited"),
                   "input_tokens": i, "output_tokens": 2 * i, "cache_write_tokens": i % 3,
                   "cache_read_tokens": 3 * i, "cost_usd": i / 1000,
                   "latency_ms": 10.0 + i, "client_ip": None, "cost_center": None, "environment": None,
                   "mcp_server": "files" if i % 2 else None, "mcp_method": "tools/call" if i % 2 else None,
                   "tool": "read" if i % 2 else None, "time": now - timedelta(hours=i)} for i in range(50)]
        async with db.write() as s:
            await s.execute(insert(UsageEvent), stored)
        # 0010 runs: creates the rollups and backfills them from the events; then 0011 and 0012 backfill
        # the organization rollups from those (which this summary, not filtered by key, reads).
        await migrate.upgrade(db)
        async with db.read() as s:
            org_days = (await s.execute(text_(f"SELECT SUM(requests) FROM {rollups.ORG_TABLES['d']}"))).scalar_one()
            org_minutes = (await s.execute(text_(f"SELECT SUM(requests) FROM {rollups.ORG_TABLES['m']}")
                                           )).scalar_one()
        assert org_days == 50 and org_minutes == 50  # 0012 backfills the organization minutes from 0010's
        usage = UsageService(db)
        summary = await usage.summary(_principal("org_old"), since="3d", group_by="model")
        [row] = summary["data"]
        assert row["requests"] == 50 and row["errors"] == 10
        assert (row["served"], row["refused"], row["failed"]) == (40, 5, 5)
        assert row["input_tokens"] == sum(range(50)) and row["output_tokens"] == 2 * sum(range(50))
        assert row["cache_write_tokens"] == sum(i % 3 for i in range(50))
        assert row["cache_read_tokens"] == 3 * sum(range(50))
        assert math.isclose(row["cost_usd"], sum(range(50)) / 1000)
        by_tool = await usage.summary(_principal("org_old"), since="3d", group_by="tool")
        assert {r["group"]: r["requests"] for r in by_tool["data"]} == {"read": 25, "(none)": 25}
        lo, hi = usage.window("3d")
        refused = await db.run_read(lambda s: rollups.refusals(s.connection(), ["key_old"], lo, hi))
        assert refused == {"rate_limited": 5}
        files = await db.run_read(lambda s: rollups.counts(s.connection(), "org_old", lo, hi, None, "files"))
        assert files == (25, sum(1 for i in range(1, 50, 2) if not i % 5))
        day, month = await usage.spent_so_far("key_old")
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        assert math.isclose(day, sum(e["cost_usd"] for e in stored if e["time"] >= today), abs_tol=1e-12)
        month_start = today.replace(day=1)
        assert math.isclose(month, sum(e["cost_usd"] for e in stored if e["time"] >= month_start), abs_tol=1e-12)
    finally:
        await db.dispose()


async def test_retention_prunes_in_bounded_batches(settings_factory: Any) -> None:
    settings = settings_factory()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, settings.database_schema)
    try:
        await migrate.upgrade(db)
        usage = UsageService(db, Retention(minute_days=14, hour_days=60, day_days=0))
        async with db.write() as s:
            s.add(Organization(id="org_r", name="retention"))
        now = datetime.now(UTC)
        ages = [1, 2, 20, 21, 70, 100, 101, 102]  # days
        # Written while nothing was pruned (retention 0 everywhere), then pruned with the retention above.
        await UsageService(db, Retention(0, 0, 0)).insert([
            {"org_id": "org_r", "key_id": "key_r", "parent_id": None, "provider": None, "model": "m",
             "endpoint": "/v1/models", "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1,
             "cost_usd": 0.5, "latency_ms": 2.0, "client_ip": None, "cost_center": None, "environment": None,
             "time": now - timedelta(days=d)} for d in ages for _ in range(3)])
        removed = await usage.prune(90, batch=4, pause=0)
        async with db.read() as s:
            times = [t for (t,) in await s.execute(select(UsageEvent.time))]
            grains = {g: (await s.execute(text_(f"SELECT count(*) FROM {t}"))).scalar_one()
                      for g, t in rollups.TABLES.items()}
            grains.update({f"o{g}": (await s.execute(text_(f"SELECT count(*) FROM {t}"))).scalar_one()
                           for g, t in rollups.ORG_TABLES.items()})
        assert sorted({round((now - t).total_seconds() / 86400) for t in times}) == [1, 2, 20, 21, 70]
        # minutes: 14 days, hours: 60 days (keyed and organization), days: forever
        assert grains == {"m": 2, "h": 4, "d": 8, "om": 2, "oh": 4, "od": 8}
        assert removed == 9 + 6 + 6 + 4 + 4
        # What is left still adds up: the day rollups keep the whole history's totals.
        summary = await usage.summary(_principal("org_r"), since="200d", group_by="model")
        assert summary["data"][0]["requests"] == 24 and math.isclose(summary["data"][0]["cost_usd"], 12.0)
    finally:
        await db.dispose()


async def test_minute_rollups_past_retention_are_not_written(settings_factory: Any) -> None:
    """A flush of old events (a backfill, a late buffer) writes no minute rows that retention would delete
    at its next pass; hours, days and the organization rollups get every event."""
    settings = settings_factory()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, settings.database_schema)
    try:
        await migrate.upgrade(db)
        usage = UsageService(db, Retention(minute_days=14, hour_days=60, day_days=0))
        now = datetime.now(UTC)
        ages = [0, 1, 13, 15, 20, 70]  # days
        await usage.insert([{"org_id": "org_w", "key_id": "key_w", "parent_id": None, "provider": None, "model": "m",
                             "endpoint": "/v1/models", "status": 200, "code": "ok", "input_tokens": 1,
                             "output_tokens": 1, "cost_usd": 0.5, "latency_ms": 2.0, "client_ip": None,
                             "cost_center": None, "environment": None, "time": now - timedelta(days=d)}
                            for d in ages for _ in range(2)])

        def buckets(s: Any) -> dict[str, list[int]]:
            conn = s.connection()
            return {g: [int(b) for (b,) in conn.execute(text_(f"SELECT bucket FROM {t} ORDER BY bucket"))]
                    for g, t in {**rollups.TABLES, **{f"o{g}": t for g, t in rollups.ORG_TABLES.items()}}.items()}

        rows = await db.run_read(buckets)
        cut = now.timestamp() - 14 * 86400
        assert len(rows["m"]) == 3 and all(b >= cut - 60 for b in rows["m"])  # 0, 1 and 13 days old
        assert rows["om"] == rows["m"]
        assert len(rows["h"]) == len(rows["oh"]) == 6  # the hour rows are kept 60 days: all written
        assert rows["d"] == rows["od"] and len(rows["d"]) == 6
        summary = await usage.summary(_principal("org_w"), since="90d", group_by="model")
        assert summary["data"][0]["requests"] == 12
    finally:
        await db.dispose()


def test_backfill_builds_the_write_paths_rollups(store: tuple[asyncio.Runner, Database]) -> None:
    """Events stored raw and then folded in by ``rollups.backfill_page`` (migrations) or by
    ``rollups.backfill_range`` (SQL in the store: bench/scale.py's bulk loader) give exactly the rollup
    rows that the write path gives for the same events, in every table:
    the same dimensions and counts, the same sums (cost to float rounding), minute rows only within the
    minute rollups' retention."""
    runner, db = store
    rng = random.Random(12)
    drawn = [{"offset": rng.choice([rng.randint(0, 20 * 86400), rng.randint(0, 3600)]),
              "key": rng.choice(["a", "b", "sub", None]), "provider": rng.choice(["openai", None]),
              "model": rng.choice(["gpt-4o-mini", "echo-1"]), "endpoint": "/v1/chat/completions",
              "status": rng.choice([200, 200, 429, 502]), "code": "rate_limited",
              "input_tokens": rng.randint(0, 900), "output_tokens": rng.randint(0, 900),
              "cache_write_tokens": rng.randint(0, 9), "cache_read_tokens": rng.randint(0, 9),
              "mcp": rng.choice([None, ("files", "tools/call", "read")]), "cost_usd": rng.random(),
              "latency_ms": rng.lognormvariate(5, 1.5), "cost_center": rng.choice(["billing", None]),
              "environment": "prod"} for _ in range(300)]
    drawn.sort(key=lambda d: -d["offset"])  # time order, as the buffer writes them
    # A few events a few microseconds either side of a minute's end (a store may round the fraction).
    edge = rollups.floor_to(int(_NOW) - 7200, 3600)
    edges = [datetime.fromtimestamp(edge, UTC) + timedelta(microseconds=us) for us in (-400, -1, 0, 1, 600)]
    written, paged, in_sql = secrets.token_hex(4), secrets.token_hex(4), secrets.token_hex(4)
    usage = UsageService(db, Retention(minute_days=14, hour_days=60))
    floor = usage.minute_floor()

    def events(org: str) -> list[dict[str, Any]]:
        out = _events(org, drawn)
        for e, at in zip(out, edges, strict=False):
            e["time"] = at
        return out

    async def store_raw(org: str) -> tuple[int, int]:
        async with db.read() as s:
            last = (await s.execute(text_("SELECT COALESCE(MAX(pk), 0) FROM usage_events"))).scalar_one()
        async with db.write() as s:
            await s.execute(insert(UsageEvent), [{**e, **{k: e.get(k) for k in ("mcp_server", "mcp_method", "tool")}}
                                                 for e in events(org)])
        return last, last + len(drawn)

    async def run() -> tuple[dict[str, list[Any]], ...]:
        mine = events(written)
        for i in range(0, len(drawn), 64):
            await usage.insert(mine[i:i + 64])
        last: int | None = (await store_raw(paged))[0]
        while last is not None:  # pages that do not line up with the write path's batches
            last = await db.run_write(lambda s, a=last: rollups.backfill_page(s.connection(), a, 50, floor))
        after, upto = await store_raw(in_sql)
        for lo in range(after, upto, 70):  # ranges whose hour and day rows overlap: the sums must add up
            await db.run_write(lambda s, a=lo: rollups.backfill_range(s.connection(), a, min(a + 70, upto), floor))

        def rows(s: Any, org: str) -> dict[str, list[Any]]:
            out = {}
            for table in (*rollups.TABLES.values(), *rollups.ORG_TABLES.values()):
                result = s.connection().execute(text_(f"SELECT * FROM {table} WHERE org_id = :org"), {"org": org})
                columns = list(result.keys())
                # The key ids name their organization: compare them without it.
                out[table] = sorted(tuple(v.replace(org, "") if isinstance(v, str) else v
                                          for c, v in zip(columns, r, strict=True) if c != "org_id") for r in result)
            return out

        return tuple([await db.run_read(lambda s, o=o: rows(s, o)) for o in (written, paged, in_sql)])

    by_writes, *by_backfills = runner.run(run())
    assert len(by_writes[rollups.ORG_TABLES["m"]]) > 0
    for by_backfill in by_backfills:
        for table, expected in by_writes.items():
            got = by_backfill[table]
            assert len(got) == len(expected), table
            for a, b in zip(got, expected, strict=True):
                assert len(a) == len(b) and all(
                    x == y or (isinstance(x, float) and math.isclose(x, y, rel_tol=1e-9))
                    or (not isinstance(x, str) and int(x) == int(y) == x)  # PostgreSQL's SUM: numeric
                    for x, y in zip(a, b, strict=True)), (table, a, b)
