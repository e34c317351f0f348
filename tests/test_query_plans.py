"""Every query a request path runs is an index lookup: captured from real cache-missing requests,
then EXPLAINed on the store that ran them (no full table scan, whatever the history)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text

from keyplane.app import KeyplaneApp
from keyplane.runtime.spend import LocalSpend
from tests.conftest import bearer, create_key


@pytest.fixture
async def quiet_app(settings_factory: Any) -> Any:
    """The app with its background jobs (change poll, alerts, retention) out of the way: only the
    requests' own queries reach the store while they are captured."""
    application = KeyplaneApp(settings_factory(change_poll_seconds=3600, alert_interval_seconds=3600,
                                                retention_interval_seconds=3600, last_used_flush_seconds=3600))
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def quiet_client(quiet_app: KeyplaneApp) -> Any:
    transport = httpx.ASGITransport(app=quiet_app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
        yield c


def _engines(app: KeyplaneApp) -> list[Any]:
    db = app.kp.db
    engines = [db.write_engine.sync_engine, db.read_engine.sync_engine]
    engines += [db.statement_engine.sync_engine] if db.statement_engine is not None else []
    engines += [e for e in (db._sync_reads, db._sync_writes) if e is not None]
    return list({id(e): e for e in engines}.values())


async def _request_path_queries(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> list[
        tuple[str, Any]]:
    resp = await client.post("/api/v1/limit-profiles", json={
        "name": "metered", "requests_per_minute": 1000, "cost_per_day_usd": 5, "budget_per_month_usd": 100},
        headers=admin)
    assert resp.status_code == 201, resp.text
    parent, _ = await create_key(client, admin, name="team", limit_profile="metered", scopes=["models:read"])
    resp = await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "laptop"}, headers=admin)
    assert resp.status_code == 201, resp.text
    sub_secret = resp.json()["secret"]
    # Some history for the planner to see.
    await app.kp.usage.insert([{
        "org_id": None, "key_id": parent["id"], "parent_id": None, "provider": "p", "model": "m",
        "endpoint": "/v1/models", "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1,
        "cost_usd": 0.01, "latency_ms": 3.0, "client_ip": None, "cost_center": None, "environment": None,
        "time": datetime.now(UTC)}])

    # Cold: nothing cached, no spend window seeded, no route table.
    app.kp.key_cache.clear()
    app.kp.sa_cache.clear()
    app.kp.routes.clear()
    if isinstance(app.kp.spend, LocalSpend):
        app.kp.spend = LocalSpend(app.kp.usage.spent_so_far)
    else:
        app.kp.spend.local = LocalSpend(app.kp.usage.spent_so_far)
        prefix = app.kp.shared.prefix
        keys = [k async for k in app.kp.shared.client.scan_iter(match=f"{prefix}sp:*")]
        if keys:
            await app.kp.shared.client.delete(*keys)

    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            captured.append((statement, parameters))

    engines = _engines(app)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", capture)
    try:
        resp = await client.get("/v1/models", headers=bearer(sub_secret))
        assert resp.status_code == 200, resp.text
        # What the LLM routes do next: the budget check of the key and its parent (first use: seeded).
        snapshot = await app.kp.lookup_key(sub_secret)
        assert snapshot is not None and len(snapshot.spend_limits) == 2  # the sub-key inherits the budget
        from keyplane.runtime.spend import Ask, Grant

        grant = await app.kp.reserve_spend(snapshot, Ask(prompt_tokens=10, prompt_usd=0.0, output_tokens=10,
                                                         output_usd_per_token=0.0, clamp=True))
        assert isinstance(grant, Grant)  # reserved (a small request fits the budget), after seeding both windows
        await app.kp.settle_spend(snapshot, grant, 0, 0.0)
        resp = await client.post("/api/v1/keys/verify", json={"key": sub_secret}, headers=admin)
        assert resp.status_code == 200, resp.text
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", capture)
    return captured


async def test_request_path_queries_are_index_lookups(quiet_app: KeyplaneApp, quiet_client: httpx.AsyncClient) -> None:
    app = quiet_app
    assert app.bootstrap is not None and app.bootstrap.admin_token
    queries = await _request_path_queries(app, quiet_client, bearer(app.bootstrap.admin_token))
    text_of = " ".join(q for q, _ in queries)
    # The path did reach the store: the key, its parent, the spend seeds (rollups), the caller.
    assert "virtual_keys" in text_of and "usage_rollups" in text_of and "service_accounts" in text_of
    assert "usage_events" not in text_of  # never the raw history on a request path
    db = app.kp.db
    if db.is_sqlite:
        assert db._sync_reads is not None
        with db._sync_reads.connect() as conn:
            tables = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars())
            for statement, params in queries:
                plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
                details = [row[-1] for row in plan]
                # A full pass over a stored table (or one of its indexes); a subquery's rows are fine.
                scans = [d for d in details if d.startswith("SCAN ") and d.split()[1] in tables]
                assert not scans, (statement, details)
    else:
        async with db.read_engine.connect() as conn:
            # A tiny test table is cheaper to read whole: forbid that, so only a missing index shows a Seq Scan.
            await conn.execute(text("SET enable_seqscan = off"))
            for statement, params in queries:
                plan = (await conn.exec_driver_sql("EXPLAIN " + statement, params)).scalars().all()
                assert not any("Seq Scan" in line for line in plan), (statement, plan)


async def test_a_spend_seed_is_one_statement(quiet_app: KeyplaneApp, quiet_client: httpx.AsyncClient) -> None:
    """A key's first budget check costs one statement, however deep its sub-keys nest (the walk used to
    be a query per level, then the read: each a round trip on PostgreSQL), and counts them all."""
    app = quiet_app
    assert app.bootstrap is not None and app.bootstrap.admin_token
    admin = bearer(app.bootstrap.admin_token)
    parent, _ = await create_key(quiet_client, admin, name="team", scopes=["models:read"])
    chain = [parent["id"]]
    for name in ("child", "grandchild"):
        resp = await quiet_client.post(f"/api/v1/keys/{chain[-1]}/subkeys", json={"name": name}, headers=admin)
        assert resp.status_code == 201, resp.text
        chain.append(resp.json()["key"]["id"])
    now = datetime.now(UTC)
    await app.kp.usage.insert([{
        "org_id": app.bootstrap.org_id, "key_id": key_id, "parent_id": parent_id, "provider": "p", "model": "m",
        "endpoint": "/v1/chat/completions", "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1,
        "cost_usd": cost, "latency_ms": 3.0, "client_ip": None, "cost_center": None, "environment": None,
        "time": now} for key_id, parent_id, cost in zip(chain, [None, *chain[:-1]], (0.25, 0.5, 2.0), strict=True)])

    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK"):  # SQLite's, in-process
            statements.append(statement)

    engines = _engines(app)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", capture)
    try:
        seeds = [await app.kp.usage.spent_so_far(key_id) for key_id in chain]
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", capture)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    expected = [2.75, 2.5, 2.0]  # each key's traffic: its own and its sub-keys'
    if now - month_start >= timedelta(days=1):  # not the month's first day: today's spend is all of it
        assert seeds == [pytest.approx((c, c)) for c in expected]
    else:
        assert [month for _, month in seeds] == pytest.approx(expected)
    assert len(statements) == len(chain), statements


async def test_the_spend_seeds_connection_is_open_before_the_first_budgeted_request(quiet_app: KeyplaneApp) -> None:
    """On PostgreSQL the seed runs on a pool of its own: a start opens its first connection (and prepares
    the statement), so a key's first budgeted request after a start does not pay for either."""
    statement_engine = quiet_app.kp.db.statement_engine
    if statement_engine is None:  # SQLite: the seed runs on the read thread, nothing to open
        assert quiet_app.kp.db.is_sqlite
        return
    assert statement_engine.pool.checkedin() >= 1
