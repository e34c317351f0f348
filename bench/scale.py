"""Months of traffic, same speed: summaries, budget checks and the data plane over millions of usage events.

    python bench/scale.py                                   # SQLite, 1M then 10M events
    python bench/scale.py --events 1000000,10000000 --stores sqlite,postgresql \
        --postgres postgresql+asyncpg://postgres@127.0.0.1:5432/test

For each store, in one run: 100 keys (20 of them sub-keys) under a metered limit profile; usage events
spread over the last 31 days, loaded (``--loader``) either

- ``bulk`` (default): the events stored raw in big transactions (COPY on PostgreSQL), then folded into
  the rollups by keyplane's own set-based backfill (``rollups.backfill_range``: one INSERT … SELECT …
  GROUP BY … ON CONFLICT per rollup table and 500,000 events, in the store). Before loading, a sample
  of 20,000 events goes both ways (the write path, and this loader) and every rollup table's rows must
  be the same (tests/test_usage_rollups.py checks the same on random events); on PostgreSQL the usage
  tables are then vacuumed and analyzed, what autovacuum does after such a load (``--no-vacuum``: not); or
- ``service``: keyplane's write path itself (``UsageService.insert``, what the gateway's usage buffer
  flushes: events plus rollups, 20,000 a batch), ~5x slower;

then, at each size (the store grows from one size to the next):

- the usage summary (``GET /api/v1/usage/summary`` through the service) for 24 h, 7 d and 30 d:
  best, median and worst of 9, and the Python heap peak of one 30-day summary (tracemalloc);
- a key's first budget check: a sub-key whose parent has a budget, fresh spend counters (what the
  first request after a start does), median and worst over 10 keys;
- the data plane: ``GET /v1/models`` with an enforced key, one request at a time from a probe in the
  same process, p50/p99 alone and while 30-day summaries run back to back through the REST API.

Results go to stdout and ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from keyplane.app import KeyplaneApp  # noqa: E402
from keyplane.config import Settings  # noqa: E402
from keyplane.runtime.spend import Ask, Grant, LocalSpend  # noqa: E402
from keyplane.services.principal import system  # noqa: E402
from keyplane.services.schemas import KeyCreate, LimitProfileCreate  # noqa: E402
from keyplane.services.usage import _sqlite_insert_events, as_rows  # noqa: E402
from keyplane.store import rollups  # noqa: E402

MASTER_KEY = "a2V5cGxhbmUtdGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGU="
MODELS = [("gpt-4o-mini", "openai", 0.15, 0.6), ("gpt-4o", "openai", 2.5, 10.0),
          ("claude-sonnet", "anthropic", 3.0, 15.0), ("text-embedding-3-small", "openai", 0.02, 0.0)]
SPAN_SECONDS = 31 * 86400
BACKFILL_PAGE = 500_000


async def make_keys(kp: Any, org_id: str) -> list[dict[str, Any]]:
    who = system(org_id)
    await kp.limit_profiles.create(who, LimitProfileCreate(
        name="metered", requests_per_minute=10_000_000, cost_per_day_usd=1e6, budget_per_month_usd=1e7))
    keys = []
    for i in range(80):
        key, secret = await kp.keys.create(who, KeyCreate(
            name=f"app-{i}", scopes=["models:read", "chats:create"], limit_profile="metered",
            cost_center=f"team-{i % 8}", environment="prod" if i % 3 else "staging"))
        keys.append({"id": key["id"], "parent_id": None, "secret": secret, "cost_center": f"team-{i % 8}",
                     "environment": "prod" if i % 3 else "staging"})
    for i in range(20):
        parent = keys[i]
        key, secret = await kp.keys.create_subkey(who, parent["id"], KeyCreate(name=f"laptop-{i}"))
        keys.append({"id": key["id"], "parent_id": parent["id"], "secret": secret,
                     "cost_center": parent["cost_center"], "environment": parent["environment"]})
    return keys


def events(n: int, org_id: str, keys: list[dict[str, Any]], now: float, rng: random.Random,
           size: int = 20_000) -> Any:
    """n usage events over the last 31 days, in time order (as the gateway's buffer writes them), in
    batches of ``size`` (20,000: a busy buffer's flush)."""
    batch: list[dict[str, Any]] = []
    weights = [1.0 / (i + 1) for i in range(len(keys))]  # a few busy keys, a long tail
    chosen = rng.choices(keys, weights=weights, k=min(n, 200_000))
    for i in range(n):
        k = chosen[i % len(chosen)]
        model, provider, pin, pout = MODELS[i % 7 % 4]
        roll = rng.random()
        status = 200 if roll < 0.97 else (429 if roll < 0.99 else 502)
        tin, tout = (rng.randint(50, 4000), rng.randint(0, 1000)) if status == 200 else (0, 0)
        batch.append({
            "org_id": org_id, "key_id": k["id"], "parent_id": k["parent_id"], "provider": provider, "model": model,
            "endpoint": "/v1/embeddings" if model.startswith("text-") else "/v1/chat/completions",
            "status": status, "code": "ok" if status == 200 else "error", "input_tokens": tin,
            "output_tokens": tout, "cost_usd": (tin * pin + tout * pout) / 1e6,
            "latency_ms": rng.lognormvariate(6.0, 0.8), "client_ip": "10.0.0.1", "cost_center": k["cost_center"],
            "environment": k["environment"],
            "time": datetime.fromtimestamp(now - SPAN_SECONDS + (i + rng.random()) / n * SPAN_SECONDS, UTC),
        })
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def load(kp: Any, n: int, org_id: str, keys: list[dict[str, Any]], rng: random.Random) -> float:
    started = time.perf_counter()
    done = 0
    for batch in events(n, org_id, keys, time.time() - 60, rng):
        await kp.usage.insert(batch)
        done += len(batch)
        if done % 1_000_000 < len(batch):
            print(f"    loaded {done:,} ({done / (time.perf_counter() - started):,.0f}/s)", flush=True)
    return time.perf_counter() - started


_EVENT_COLUMNS = ("org_id", "key_id", "parent_id", "provider", "model", "endpoint", "status", "code", "input_tokens",
                  "output_tokens", "cache_write_tokens", "cache_read_tokens", "cost_usd", "latency_ms", "client_ip",
                  "cost_center", "environment", "mcp_server", "mcp_method", "tool", "time")


async def store_raw(kp: Any, batch: list[dict[str, Any]]) -> None:
    """Usage events into ``usage_events`` only (no rollups), one transaction: the driver's executemany on
    SQLite (as the write path does), COPY on PostgreSQL."""
    if kp.db.is_sqlite:
        rows = as_rows(batch)  # the write path's tuples (issue 19): dict events would not bind
        await kp.db.run_dbapi_write(lambda cursor: _sqlite_insert_events(cursor, rows))
        return
    records = [tuple(e.get(c, 0) if c.startswith("cache_") else e.get(c) for c in _EVENT_COLUMNS) for e in batch]
    async with kp.db.write_engine.connect() as conn:
        raw = await conn.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(
            "usage_events", records=records, columns=_EVENT_COLUMNS, schema_name=kp.db.schema)
        await conn.commit()


async def last_pk(kp: Any) -> int:
    async with kp.db.read() as s:
        return int((await s.execute(text("SELECT COALESCE(MAX(pk), 0) FROM usage_events"))).scalar_one())


async def fold_in(kp: Any, after: int, page: int = BACKFILL_PAGE, now: float | None = None) -> None:
    """Every event stored after pk ``after`` into the rollups, through keyplane's set-based backfill
    (``rollups.backfill_range``), ``page`` events per transaction; minute rows within the minute
    rollups' retention only, as the write path."""
    floor = kp.usage.minute_floor(now)
    upto = await last_pk(kp)
    for lo in range(after, upto, page):
        await kp.db.run_write(lambda s, a=lo: rollups.backfill_range(s.connection(), a, min(a + page, upto), floor))


async def vacuum(kp: Any) -> None:
    """What PostgreSQL's autovacuum does to a store within a minute or so of a bulk load (its insert and
    dead-row thresholds are 20% of a table): VACUUM (dead row versions of the upserted rollups gone, the
    visibility map set, so index-only scans read no heap) and ANALYZE (statistics for the planner). A
    store filled over weeks by the gateway got this many times over; a store measured minutes after a
    COPY and a backfill, with no autovacuum yet (or none: this machine's server runs with
    ``autovacuum = off``), is one no deployment runs in. SQLite has no such daemon: nothing to do."""
    if kp.db.is_sqlite:
        return
    async with kp.db.write_engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("virtual_keys", "usage_events", *rollups.TABLES.values(), *rollups.ORG_TABLES.values()):
            await conn.exec_driver_sql(f"VACUUM ANALYZE {table}")


async def bulk_load(kp: Any, n: int, org_id: str, keys: list[dict[str, Any]], rng: random.Random,
                    autovacuum: bool = True) -> dict[str, float]:
    started = time.perf_counter()
    after = await last_pk(kp)
    done = 0
    for batch in events(n, org_id, keys, time.time() - 60, rng, size=100_000):
        await store_raw(kp, batch)
        done += len(batch)
        if done % 1_000_000 < len(batch):
            print(f"    stored {done:,} raw ({done / (time.perf_counter() - started):,.0f}/s)", flush=True)
    stored = time.perf_counter()
    await fold_in(kp, after)
    ended = time.perf_counter()
    print(f"    rollups backfilled in {ended - stored:,.0f} s", flush=True)
    if autovacuum:
        await vacuum(kp)
    vacuumed = time.perf_counter()
    if autovacuum and not kp.db.is_sqlite:
        print(f"    vacuumed and analyzed in {vacuumed - ended:,.0f} s (not counted in the load time)", flush=True)
    return {"seconds": ended - started, "events_seconds": stored - started, "rollups_seconds": ended - stored,
            "vacuum_seconds": vacuumed - ended}


async def check_loader(kp: Any, keys: list[dict[str, Any]], n: int = 20_000) -> dict[str, int]:
    """The same sample of events through the write path (into one organization) and through the bulk
    loader (into another): every rollup table must hold the same rows (cost and latency sums to float
    rounding). Both samples are deleted afterwards."""
    rng = random.Random(7)
    sample = [e for batch in events(n, "check-writes", keys, time.time() - 60, rng) for e in batch]
    now = time.time()  # one minute-retention cut for both ways
    for i in range(0, n, 2_000):  # a few batches: the upserts must add up
        await kp.usage.insert(sample[i:i + 2_000], now=now)
    after = await last_pk(kp)
    await store_raw(kp, [{**e, "org_id": "check-bulk"} for e in sample])
    await fold_in(kp, after, page=3_000, now=now)  # pages that do not line up with the batches

    def rows(s: Any, org: str) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        for table in (*rollups.TABLES.values(), *rollups.ORG_TABLES.values()):
            result = s.execute(text(f"SELECT * FROM {table} WHERE org_id = :org"), {"org": org})
            out[table] = sorted(tuple(v for c, v in zip(result.keys(), r, strict=True) if c != "org_id")
                                for r in result)
        return out

    written = await kp.db.run_read(lambda s: rows(s, "check-writes"))
    loaded = await kp.db.run_read(lambda s: rows(s, "check-bulk"))
    for table, expected in written.items():
        got = loaded[table]
        assert len(got) == len(expected) > 0, (table, len(got), len(expected))
        for a, b in zip(got, expected, strict=True):
            assert all(x == y or (isinstance(x, float) and math.isclose(x, y, rel_tol=1e-9))
                       for x, y in zip(a, b, strict=True)), (table, a, b)

    def delete(s: Any) -> None:
        for table in ("usage_events", *rollups.TABLES.values(), *rollups.ORG_TABLES.values()):
            s.execute(text(f"DELETE FROM {table} WHERE org_id IN ('check-writes', 'check-bulk')"))

    await kp.db.run_write(delete)
    counts = {table: len(r) for table, r in written.items()}
    print(f"  loader check: same rollup rows both ways for {n:,} events: {counts}", flush=True)
    return counts


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


async def probe(client: httpx.AsyncClient, secret: str, seconds: float) -> dict[str, float]:
    latencies = []
    headers = {"Authorization": f"Bearer {secret}"}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        resp = await client.get("/v1/models", headers=headers)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert resp.status_code == 200, resp.text
    return {"requests": len(latencies), "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2),
            "max_ms": round(max(latencies), 2)}


async def measure(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], org_id: str,
                  keys: list[dict[str, Any]], probe_seconds: float) -> dict[str, Any]:
    kp = app.kp
    who = system(org_id)
    out: dict[str, Any] = {"summary_ms": {}}
    for since in ("24h", "7d", "30d"):
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            result = await kp.usage.summary(who, since=since, group_by="model")
            times.append((time.perf_counter() - t0) * 1000)
        # min: the cost itself; median: what a user saw on this (shared, loaded) machine.
        out["summary_ms"][since] = {"min": round(min(times), 1), "median": round(statistics.median(times), 1),
                                    "max": round(max(times), 1),
                                    "requests": sum(r["requests"] for r in result["data"])}
    tracemalloc.start()
    await kp.usage.summary(who, since="30d", group_by="key")
    out["summary_30d_heap_peak_kb"] = round(tracemalloc.get_traced_memory()[1] / 1024)
    tracemalloc.stop()

    checks = []
    for k in keys[80:90]:
        snapshot = await kp.lookup_key(k["secret"])
        assert snapshot is not None and len(snapshot.spend_limits) == 2
        spend = LocalSpend(kp.usage.spent_so_far)  # fresh counters: the first check after a start
        t0 = time.perf_counter()
        grant = await spend.reserve(snapshot.spend_limits, Ask(prompt_tokens=10, prompt_usd=0.0, output_tokens=10,
                                                                output_usd_per_token=0.0, clamp=True))
        assert isinstance(grant, Grant)  # seeded (the key's and its parent's windows), then reserved
        checks.append((time.perf_counter() - t0) * 1000)
    out["first_budget_check_ms"] = {"min": round(min(checks), 2), "median": round(statistics.median(checks), 2),
                                    "max": round(max(checks), 2)}

    secret = keys[1]["secret"]
    await probe(client, secret, 0.5)  # warm
    out["data_plane_alone"] = await probe(client, secret, probe_seconds)
    summaries: list[float] = []
    stop = asyncio.Event()

    async def summaries_back_to_back() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            resp = await client.get("/api/v1/usage/summary", params={"since": "30d", "group_by": "key"},
                                    headers=admin)
            assert resp.status_code == 200, resp.text
            summaries.append((time.perf_counter() - t0) * 1000)

    task = asyncio.create_task(summaries_back_to_back())
    await asyncio.sleep(0.05)
    out["data_plane_during_summaries"] = await probe(client, secret, probe_seconds)
    stop.set()
    await task
    out["concurrent_summaries"] = {"count": len(summaries), "median_ms": round(statistics.median(summaries), 1)}
    out["p99_ratio"] = round(out["data_plane_during_summaries"]["p99_ms"] / out["data_plane_alone"]["p99_ms"], 2)
    async with kp.db.read() as s:
        out["rows"] = {"usage_events": (await s.execute(text("SELECT count(*) FROM usage_events"))).scalar_one()}
        for table in (*rollups.TABLES.values(), *rollups.ORG_TABLES.values()):
            out["rows"][table] = (await s.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def bench_settings(home: Path, postgres: str | None, schema: str) -> Settings:
    """A bench store's settings: background jobs out of the way; on PostgreSQL a fresh schema of its own."""
    overrides: dict[str, Any] = {"home": home, "access_log": False, "alert_interval_seconds": 3600,
                                 "retention_interval_seconds": 3600}
    if postgres:
        engine = create_async_engine(postgres)
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await engine.dispose()
        overrides.update(database_url=postgres, database_schema=schema, master_key=MASTER_KEY)
    return Settings(**overrides)


async def run_store(store: str, sizes: list[int], postgres: str | None, probe_seconds: float,
                    home: str | None = None, loader: str = "bulk", autovacuum: bool = True) -> dict[str, Any]:
    schema = f"kp_bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="kp-scale-") as tmp:
        if store == "postgresql":
            assert postgres, "--postgres URL needed"
        app = KeyplaneApp(await bench_settings(Path(home or tmp), postgres if store == "postgresql" else None,
                                               schema))
        boot = await app.startup()
        try:
            org_id = boot.org_id
            admin = {"Authorization": f"Bearer {boot.admin_token}"}
            keys = await make_keys(app.kp, org_id)
            rng = random.Random(13)
            results: dict[str, Any] = {}
            if loader == "bulk":
                results["loader_check_rows"] = await check_loader(app.kp, keys)
            loaded = 0
            transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as client:
                for size in sizes:
                    print(f"  {store}: loading {size - loaded:,} events (to {size:,})", flush=True)
                    if loader == "bulk":
                        parts = await bulk_load(app.kp, size - loaded, org_id, keys, rng, autovacuum)
                    else:
                        parts = {"seconds": await load(app.kp, size - loaded, org_id, keys, rng)}
                    seconds = parts["seconds"]
                    previous, loaded = loaded, size
                    print(f"  {store}: measuring at {size:,}", flush=True)
                    results[str(size)] = {"loader": loader, **{k: round(v, 1) for k, v in parts.items()},
                                          "load_seconds": round(seconds, 1),
                                          "load_minutes_per_million": round(seconds / 60 / (size - previous) * 1e6, 2),
                                          "load_average_after_load": [round(x, 2) for x in os.getloadavg()],
                                          **await measure(app, client, admin, org_id, keys, probe_seconds)}
                    print(json.dumps(results[str(size)], indent=1), flush=True)
            return results
        finally:
            await app.shutdown()
            if store == "postgresql":
                engine = create_async_engine(postgres or "")
                async with engine.begin() as conn:
                    await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="1000000,10000000", help="comma-separated sizes, ascending")
    parser.add_argument("--stores", default="sqlite", help="sqlite,postgresql")
    parser.add_argument("--postgres", default=None, help="postgresql+asyncpg://… (a schema is made and dropped)")
    parser.add_argument("--probe-seconds", type=float, default=5.0)
    parser.add_argument("--home", default=None, help="keep the SQLite store here (default: a temporary folder)")
    parser.add_argument("--loader", choices=("bulk", "service"), default="bulk",
                        help="bulk: raw events then keyplane's backfill (checked against the write path first); "
                             "service: UsageService.insert")
    parser.add_argument("--no-vacuum", action="store_true",
                        help="PostgreSQL: measure right after the bulk load, before what autovacuum does "
                             "(VACUUM ANALYZE of the usage tables; done by default)")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sizes = [int(s) for s in args.events.split(",")]
    report: dict[str, Any] = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "sizes": sizes}
    for store in args.stores.split(","):
        report[store] = asyncio.run(run_store(store, sizes, args.postgres, args.probe_seconds, args.home,
                                              args.loader, not args.no_vacuum))
    out = ROOT / "bench" / "results" / f"scale-{args.stores.replace(',', '-')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
