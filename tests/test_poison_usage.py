"""A usage record the store refuses never stops usage recording; anonymous traffic costs no disk."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import func, select

from keyplane.app import KeyplaneApp
from keyplane.store import rollups
from keyplane.store.models import UsageEvent
from tests.conftest import bearer, create_key

CHAT = "/v1/chat/completions"


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "org_id": "org_x", "key_id": "vk_x", "parent_id": None, "provider": None, "model": "gpt-test",
        "endpoint": CHAT, "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1, "cost_usd": 0.0,
        "latency_ms": 1.0, "client_ip": "127.0.0.1", "cost_center": None, "environment": None,
        "time": datetime.now(UTC)}
    return {**base, **fields}


async def rolled_up(app: KeyplaneApp, org_id: str) -> dict[str, int]:
    """Requests per model in an organization's minute, hour and day rollups (each must say the same)."""
    lo, hi = app.kp.usage.window("1h")
    per_grain = [await app.kp.db.run_read(lambda s, g=g: rollups.grouped(s.connection(), org_id, lo, hi, "model",
                                                                            max_grain=g, open_ended=True))
                 for g in ("m", "h", "d")]
    minute, hour, day = ({model: t.requests for model, t in totals.items()} for totals in per_grain)
    assert minute == hour == day
    return minute


async def stored(app: KeyplaneApp, **where: Any) -> list[UsageEvent]:
    async with app.kp.db.read() as s:
        query = select(UsageEvent).filter_by(**where)
        return list((await s.execute(query)).scalars())


async def test_a_poison_record_is_isolated_and_the_rest_of_the_batch_is_written(app: KeyplaneApp) -> None:
    buffer = app.kp.usage_buffer
    good = [event(model=f"good-{i}") for i in range(6)]
    # Straight into the queue, past the sanitising edge: the flush itself must cope with records the store
    # refuses (a NUL that PostgreSQL refuses, a NOT NULL column left empty that both stores refuse).
    nul = event(model="bad\x00model", input_tokens=3_000_000_000)
    hopeless = event(model="no-status", status=None)
    buffer._events.extend([good[0], nul, *good[1:3], hopeless, *good[3:]])

    await app.kp.flush_usage()
    assert len(buffer) == 0  # nothing left to spin on
    # SQLite takes the NUL as it is; PostgreSQL refuses it, and then the record is written sanitised.
    kept = "bad\x00model" if app.kp.db.is_sqlite else "bad\ufffdmodel"
    models = sorted(e.model for e in await stored(app, org_id="org_x"))
    assert models == sorted([*(g["model"] for g in good), kept])
    assert buffer.quarantined == 1 and buffer.written == 7
    assert buffer.sanitised == (0 if app.kp.db.is_sqlite else 1)
    (repaired,) = await stored(app, model=kept)
    assert repaired.input_tokens == (3_000_000_000 if app.kp.db.is_sqlite else 2**31 - 1)
    # The rollups are written in the events' transaction: every refused attempt (the whole batch, its
    # halves, the record alone) left nothing behind, so they count each stored event exactly once.
    assert await rolled_up(app, "org_x") == {g["model"]: 1 for g in good} | {kept: 1}

    buffer.add(event(model="later"))  # recording goes on
    await app.kp.flush_usage()
    assert [e.model for e in await stored(app, model="later")] == ["later"]
    metrics = (await _get(app, "/metrics")).text
    assert "keyplane_usage_events_quarantined_total 1.0" in metrics


async def test_a_nul_model_through_the_gateway_does_not_stop_recording(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, secret = await create_key(client, admin, scopes=["chats:create", "models:read"])
    poison = await client.post(CHAT, content=b'{"model":"\\u0000","messages":[]}', headers=bearer(secret))
    assert 400 <= poison.status_code < 500, poison.text
    assert (await client.get("/v1/models", headers=bearer(secret))).status_code == 200
    await app.kp.flush_usage()
    assert len(app.kp.usage_buffer) == 0
    rows = await stored(app, key_id=key["id"])
    assert sorted(r.endpoint for r in rows) == [CHAT, "/v1/models"]
    assert "\x00" not in str([r.model for r in rows])


async def test_an_anonymous_flood_writes_no_usage_rows(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, secret = await create_key(client, admin, scopes=["models:read"])
    for i in range(30):
        headers = {"Authorization": f"Bearer mcp_sk_junk{i}"} if i % 2 else {}
        resp = await client.get("/v1/models", headers=headers)
        assert resp.status_code in (401, 429)
    assert (await client.get("/v1/nowhere")).status_code == 404
    # A known key refused is still that organization's usage.
    refused = await client.post(CHAT, json={"model": "x", "messages": []}, headers=bearer(secret))
    assert refused.status_code == 403
    await app.kp.flush_usage()
    async with app.kp.db.read() as s:
        anonymous = (await s.execute(select(func.count()).select_from(UsageEvent)
                                     .where(UsageEvent.org_id.is_(None)))).scalar_one()
    assert anonymous == 0
    assert [(r.status, r.code) for r in await stored(app, key_id=key["id"])] == [(403, "insufficient_scope")]
    metrics = (await _get(app, "/metrics")).text
    assert 'keyplane_requests_total{code="missing_bearer",route="/v1/models",status="401"}' in metrics


async def _get(app: KeyplaneApp, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
        return await c.get(path)
