"""The LLM gateway against a local fake upstream: providers, forwarding, streaming, failures, usage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key, create_sa
from tests.fake_upstream import FakeUpstream
from tests.processes import free_port, serve

UPSTREAM_SECRET = "sk-upstream-SECRET-0123456789abcdef"
CHAT = "/v1/chat/completions"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    async with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
async def provider(client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str]) -> str:
    _, url = upstream
    body = {"name": "local", "base_url": f"{url}/v1", "api_key": UPSTREAM_SECRET, "timeout_seconds": 1,
            "models": [{"name": "gpt-test", "input_per_mtok": 2.5, "output_per_mtok": 10},
                       {"name": "embed-test", "input_per_mtok": 0.1},
                       {"name": "error-model"}, {"name": "boom-model"}, {"name": "slow-model"},
                       {"name": "forever-model"}]}
    resp = await client.post("/api/v1/providers", json=body, headers=admin)
    assert resp.status_code == 201, resp.text
    return "local"


async def usage_events(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str],
                       **params: Any) -> list[dict[str, Any]]:
    await app.kp.flush_usage()
    resp = await client.get("/api/v1/usage/events", params={"limit": 200, **params}, headers=admin)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


async def test_provider_secret_is_write_only_and_encrypted(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    for resp in (await client.get("/api/v1/providers", headers=admin),
                 await client.get(f"/api/v1/providers/{provider}", headers=admin),
                 await client.get("/api/v1/audit", headers=admin)):
        assert resp.status_code == 200 and UPSTREAM_SECRET not in resp.text
    got = (await client.get(f"/api/v1/providers/{provider}", headers=admin)).json()["provider"]
    assert got["api_key"] == "sk-…cdef" and got["base_url"].endswith("/v1")
    async with app.kp.db.read() as s:
        sealed = (await s.execute(text("SELECT api_key_sealed FROM providers"))).scalar_one()
    assert UPSTREAM_SECRET not in sealed and len(sealed) > 40

    rotated = "sk-rotated-NEW-secret-999999"
    resp = await client.patch(f"/api/v1/providers/{provider}", json={"api_key": rotated}, headers=admin)
    assert resp.status_code == 200 and rotated not in resp.text
    actions = (await client.get("/api/v1/audit", params={"action": "provider.update"}, headers=admin)).json()
    assert actions["data"][0]["details"]["changes"] == {"api_key": "rotated"}


async def test_provider_input_is_checked(
    client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    base = {"name": "other", "base_url": "http://127.0.0.1:9/v1", "models": [{"name": "m1"}]}
    for bad in ({**base, "base_url": "ftp://x"}, {**base, "models": []}, {**base, "kind": "martian"},
                {**base, "models": [{"name": "m", "input_per_mtok": -1}]}, {**base, "secret": "x"},
                {**base, "timeout_seconds": 0}):
        assert_error(await client.post("/api/v1/providers", json=bad, headers=admin), 422, "invalid_request")
    dup = await client.post("/api/v1/providers", json={**base, "models": [{"name": "gpt-test"}]}, headers=admin)
    assert "gpt-test" in assert_error(dup, 409, "conflict")["message"]
    assert_error(await client.post("/api/v1/providers", json={**base, "name": provider}, headers=admin), 409,
                 "conflict")
    _, token = await create_sa(client, admin, ["virtual_keys:read"])
    resp = await client.get("/api/v1/providers", headers=bearer(token))
    assert assert_error(resp, 403, "insufficient_scope")["scope"] == "providers:manage"
    assert_error(await client.get("/api/v1/providers/nope", headers=admin), 404, "not_found")


async def test_chat_completion_is_forwarded_with_the_provider_secret(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str,
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, _ = upstream
    key, secret = await create_key(client, admin, cost_center="research", environment="prod")
    models = (await client.get("/v1/models", headers=bearer(secret))).json()["data"]
    assert {m["id"] for m in models} >= {"gpt-test", "embed-test"} and models[0]["owned_by"] == "local"

    resp = await client.post(CHAT, json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
                             headers=bearer(secret))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "hello"
    assert resp.headers["ratelimit-limit"] == "60"
    sent = fake.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert secret not in str(sent)  # the client's own key never reaches the upstream
    assert sent["body"]["messages"][0]["content"] == "hi"

    emb = await client.post("/v1/embeddings", json={"model": "embed-test", "input": "x"}, headers=bearer(secret))
    assert emb.status_code == 200
    comp = await client.post("/v1/completions", json={"model": "gpt-test", "prompt": "x"}, headers=bearer(secret))
    assert comp.status_code == 200

    events = await usage_events(app, client, admin, key_id=key["id"])
    chat = next(e for e in events if e["endpoint"] == CHAT)
    assert chat["input_tokens"] == 11 and chat["output_tokens"] == 7
    assert chat["cost_usd"] == pytest.approx((11 * 2.5 + 7 * 10) / 1e6)
    assert chat["provider"] == "local" and chat["model"] == "gpt-test" and chat["status"] == 200
    assert chat["cost_center"] == "research" and chat["environment"] == "prod" and chat["client_ip"] == "127.0.0.1"
    metrics = (await client.get("/metrics")).text
    assert "keyplane_usage_events_written_total" in metrics and "keyplane_usage_events_dropped_total 0.0" in metrics
    embedding = next(e for e in events if e["endpoint"] == "/v1/embeddings")
    assert embedding["input_tokens"] == 5 and embedding["cost_usd"] == pytest.approx(5 * 0.1 / 1e6)


async def test_model_rules(client: httpx.AsyncClient, admin: dict[str, str], provider: str) -> None:
    _, secret = await create_key(client, admin, allowed_models=["gpt-test"])
    models = (await client.get("/v1/models", headers=bearer(secret))).json()["data"]
    assert [m["id"] for m in models] == ["gpt-test"]
    resp = await client.post(CHAT, json={"model": "embed-test", "messages": []}, headers=bearer(secret))
    assert assert_error(resp, 403, "model_not_allowed")["type"] == "permission_error"
    _, open_key = await create_key(client, admin)
    resp = await client.post(CHAT, json={"model": "nobody-serves-this", "messages": []}, headers=bearer(open_key))
    assert_error(resp, 404, "not_found")
    assert_error(await client.post(CHAT, json={"messages": []}, headers=bearer(open_key)), 400, "invalid_request")
    assert_error(await client.post(CHAT, content=b"{nope", headers=bearer(open_key)), 400, "invalid_request")
    assert_error(await client.post(CHAT, json=[1], headers=bearer(open_key)), 400, "invalid_request")
    _, no_chat = await create_key(client, admin, scopes=["embeddings:create"])
    resp = await client.post(CHAT, json={"model": "gpt-test"}, headers=bearer(no_chat))
    assert assert_error(resp, 403, "insufficient_scope")["scope"] == "chats:create"


async def test_upstream_failures(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    _, secret = await create_key(client, admin, limit_profile="professional")
    resp = await client.post(CHAT, json={"model": "error-model", "messages": []}, headers=bearer(secret))
    err = assert_error(resp, 400, "upstream_error")
    assert "bad request" in err["message"] and UPSTREAM_SECRET not in resp.text  # scrubbed
    resp = await client.post(CHAT, json={"model": "boom-model", "messages": []}, headers=bearer(secret))
    assert "internal upstream failure" in assert_error(resp, 500, "upstream_error")["message"]
    resp = await client.post(CHAT, json={"model": "slow-model", "messages": []}, headers=bearer(secret))
    assert assert_error(resp, 504, "upstream_timeout")["type"] == "upstream_error"

    closed = free_port()
    await client.post("/api/v1/providers", headers=admin, json={
        "name": "down", "base_url": f"http://127.0.0.1:{closed}/v1", "models": [{"name": "down-model"}]})
    resp = await client.post(CHAT, json={"model": "down-model", "messages": []}, headers=bearer(secret))
    assert "down" in assert_error(resp, 502, "upstream_error")["message"]

    codes = {(e["model"], e["status"], e["code"]) for e in await usage_events(app, client, admin)}
    assert {("error-model", 400, "upstream_error"), ("slow-model", 504, "upstream_timeout"),
            ("down-model", 502, "upstream_error")} <= codes


async def test_refused_requests_are_metered_too(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    key, secret = await create_key(client, admin, allowed_models=["gpt-test"], limit_profile="free")
    await client.post(CHAT, json={"model": "embed-test"}, headers=bearer(secret))
    for _ in range(11):
        await client.get("/v1/models", headers=bearer(secret))
    events = await usage_events(app, client, admin, key_id=key["id"])
    codes = [e["code"] for e in events]
    assert codes.count("model_not_allowed") == 1 and codes.count("rate_limited") == 2 and codes.count("ok") == 9


async def test_connections_to_the_upstream_are_reused(
    client: httpx.AsyncClient, admin: dict[str, str], provider: str, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, _ = upstream
    _, secret = await create_key(client, admin)
    for _ in range(5):
        await client.post(CHAT, json={"model": "gpt-test", "messages": []}, headers=bearer(secret))
    ports = {r["client_port"] for r in fake.requests[-5:]}
    assert len(ports) == 1


async def test_usage_summary_is_exact(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    a, secret_a = await create_key(client, admin, name="a", cost_center="cc-a")
    _, secret_b = await create_key(client, admin, name="b", cost_center="cc-b")
    for _ in range(3):
        await client.post(CHAT, json={"model": "gpt-test", "messages": []}, headers=bearer(secret_a))
    await client.post("/v1/embeddings", json={"model": "embed-test", "input": "x"}, headers=bearer(secret_b))
    await client.post(CHAT, json={"model": "error-model", "messages": []}, headers=bearer(secret_b))
    await app.kp.flush_usage()

    async def summary(group_by: str, **extra: Any) -> dict[str, dict[str, Any]]:
        resp = await client.get("/api/v1/usage/summary", params={"since": "1h", "group_by": group_by, **extra},
                                headers=admin)
        assert resp.status_code == 200, resp.text
        return {row["group"]: row for row in resp.json()["data"]}

    by_model = await summary("model")
    assert by_model["gpt-test"]["requests"] == 3 and by_model["gpt-test"]["input_tokens"] == 33
    assert by_model["gpt-test"]["output_tokens"] == 21 and by_model["gpt-test"]["total_tokens"] == 54
    assert by_model["gpt-test"]["cost_usd"] == pytest.approx(3 * (11 * 2.5 + 7 * 10) / 1e6)
    assert by_model["error-model"]["errors"] == 1 and by_model["error-model"]["error_rate"] == 1.0
    assert by_model["gpt-test"]["p50_ms"] > 0 and by_model["gpt-test"]["p95_ms"] >= by_model["gpt-test"]["p50_ms"]
    by_cc = await summary("cost_center")
    assert by_cc["cc-a"]["requests"] == 3 and by_cc["cc-b"]["requests"] == 2
    assert list(await summary("key", key_id=a["id"])) == [a["id"]]
    hours = await summary("hour")
    assert sum(r["requests"] for r in hours.values()) == 5
    assert set(await summary("provider")) == {"local"}
    resp = await client.get("/api/v1/usage/summary", params={"group_by": "colour"}, headers=admin)
    assert_error(resp, 422, "invalid_request")
    page = (await client.get("/api/v1/usage/events", params={"limit": 2}, headers=admin)).json()
    rest = (await client.get("/api/v1/usage/events", params={"limit": 10, "cursor": page["next_cursor"]},
                             headers=admin)).json()
    assert len(page["data"]) == 2 and len(rest["data"]) == 3


async def test_streaming_passes_chunks_through_and_meters_usage(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str,
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, _ = upstream
    key, secret = await create_key(client, admin)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as live:
        body = {"model": "gpt-test", "messages": [], "stream": True}
        loop = asyncio.get_running_loop()
        async with live.stream("POST", CHAT, json=body, headers=bearer(secret)) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            started = loop.time()
            arrivals = []
            text_seen = ""
            async for chunk in resp.aiter_text():
                arrivals.append(loop.time() - started)
                text_seen += chunk
        # The first chunk arrived before the upstream's 0.2 s pause ended: nothing buffered the answer.
        assert arrivals[0] < 0.15 and arrivals[-1] >= 0.15
        assert "part0" in text_seen and "part2" in text_seen and text_seen.rstrip().endswith("data: [DONE]")
    assert fake.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    events = await usage_events(app, client, admin, key_id=key["id"])
    assert events[0]["input_tokens"] == 11 and events[0]["output_tokens"] == 7 and events[0]["status"] == 200


async def test_client_disconnect_cancels_the_upstream_call(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: str,
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, _ = upstream
    key, secret = await create_key(client, admin)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as live:
        body = {"model": "forever-model", "messages": [], "stream": True}
        async with live.stream("POST", CHAT, json=body, headers=bearer(secret)) as resp:
            async for chunk in resp.aiter_text():
                assert "part0" in chunk
                break  # leave after the first chunk
        await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
        await asyncio.sleep(0.1)
    events = await usage_events(app, client, admin, key_id=key["id"])
    assert events[0]["code"] == "client_disconnected"


async def _profile(client: httpx.AsyncClient, admin: dict[str, str], **limits: Any) -> str:
    name = "p" + str(abs(hash(tuple(sorted(limits.items())))) % 10**8)
    resp = await client.post("/api/v1/limit-profiles", json={"name": name, **limits}, headers=admin)
    assert resp.status_code == 201, resp.text
    return name


async def _chat(client: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await client.post(CHAT, json={"model": "gpt-test", "messages": []}, headers=bearer(secret))


ONE_CHAT_USD = (11 * 2.5 + 7 * 10) / 1e6  # what the fake upstream's usage costs at gpt-test's prices


async def test_tokens_per_minute(client: httpx.AsyncClient, admin: dict[str, str], provider: str) -> None:
    _, secret = await create_key(client, admin, limit_profile=await _profile(client, admin, tokens_per_minute=30))
    # The body's ~12 estimated prompt tokens leave 18 for the answer: max_tokens is lowered to them.
    first = await _chat(client, secret)
    assert first.status_code == 200 and first.headers["x-keyplane-max-tokens-clamped"] == "18"
    resp = await _chat(client, secret)  # 18 used, 12 left: this prompt alone would use them all
    err = assert_error(resp, 429, "tokens_exceeded")
    assert err["limit"] == "tokens_per_minute" and 1 <= err["retry_after"] <= 60 and err["remaining"] == 12
    assert resp.headers["retry-after"] == str(err["retry_after"]) and err["resets_at"].endswith("Z")


async def test_cost_per_day(client: httpx.AsyncClient, admin: dict[str, str], provider: str) -> None:
    profile = await _profile(client, admin, cost_per_day_usd=1.5 * ONE_CHAT_USD)
    _, secret = await create_key(client, admin, limit_profile=profile)
    assert (await _chat(client, secret)).status_code == 200
    assert (await _chat(client, secret)).status_code == 200
    err = assert_error(await _chat(client, secret), 429, "budget_exceeded")
    assert err["limit"] == "cost_per_day_usd" and err["resets_at"].endswith("T00:00:00Z")
    assert err["type"] == "rate_limit_error"
    # Listing models costs nothing and is still allowed.
    assert (await client.get("/v1/models", headers=bearer(secret))).status_code == 200


async def test_monthly_budget_is_shared_by_a_parent_and_its_subkeys(
    client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    profile = await _profile(client, admin, budget_per_month_usd=1.5 * ONE_CHAT_USD)
    parent, _ = await create_key(client, admin, limit_profile=profile)
    a = (await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "a"}, headers=admin)).json()
    b = (await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "b"}, headers=admin)).json()
    assert (await _chat(client, a["secret"])).status_code == 200
    assert (await _chat(client, b["secret"])).status_code == 200
    # a has spent one chat of its own 1.5, but the parent's 1.5 are gone.
    err = assert_error(await _chat(client, a["secret"]), 429, "budget_exceeded")
    assert err["limit"] == "budget_per_month_usd" and err["resets_at"][8:] == "01T00:00:00Z"


async def test_a_restart_does_not_reset_a_budget(
    app: KeyplaneApp, settings_factory: Any, client: httpx.AsyncClient, admin: dict[str, str], provider: str
) -> None:
    profile = await _profile(client, admin, cost_per_day_usd=0.5 * ONE_CHAT_USD)
    _, secret = await create_key(client, admin, limit_profile=profile)
    assert (await _chat(client, secret)).status_code == 200
    await app.kp.flush_usage()
    restarted = KeyplaneApp(settings_factory())
    await restarted.startup()
    try:
        transport = httpx.ASGITransport(app=restarted, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as fresh:
            assert_error(await _chat(fresh, secret), 429, "budget_exceeded")
    finally:
        await restarted.shutdown()


async def test_limit_recommendation_from_real_usage(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    from datetime import UTC, datetime, timedelta

    key, _ = await create_key(client, admin, limit_profile="professional")
    empty = (await client.get(f"/api/v1/keys/{key['id']}/recommendation", headers=admin)).json()
    assert empty["observed"]["requests"] == 0 and empty["suggested_profile"] == "free"
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    events = []
    for minute in range(100):  # 100 busy minutes: 4 requests each, one minute with 20
        count = 20 if minute == 50 else 4
        for i in range(count):
            events.append({"org_id": key_id_org(app, admin), "key_id": key["id"], "parent_id": None,
                           "provider": "p", "model": "m", "endpoint": CHAT, "status": 500 if i == 0 else 200,
                           "code": "ok", "input_tokens": 100, "output_tokens": 50, "cost_usd": 0.001,
                           "latency_ms": 10.0, "client_ip": None, "cost_center": None, "environment": None,
                           "time": now - timedelta(minutes=minute, seconds=-i)})
    await app.kp.usage.insert(events)
    resp = await client.get(f"/api/v1/keys/{key['id']}/recommendation", params={"window": "24h"}, headers=admin)
    assert resp.status_code == 200, resp.text
    rec = resp.json()
    assert rec["observed"]["requests"] == 416 and rec["observed"]["peak_requests_per_minute"] == 20
    assert rec["observed"]["p99_requests_per_minute"] == 4  # the one spike is the top 1%
    assert rec["suggested_limits"]["requests_per_minute"] == 6
    assert rec["suggested_limits"]["tokens_per_minute"] == 900
    # No built-in profile caps tokens or cost: none sets every suggested limit, so a new one is proposed.
    assert rec["suggested_limits"]["cost_per_day_usd"] is not None
    assert rec["suggested_profile"] is None and rec["new_profile"] == rec["suggested_limits"]
    assert rec["current_profile"] == "professional"
    assert any("headroom" in line for line in rec["explanation"])
    assert_error(await client.get("/api/v1/keys/key_nope/recommendation", headers=admin), 404, "not_found")


def key_id_org(app: KeyplaneApp, admin: dict[str, str]) -> str:
    assert app.bootstrap is not None
    return app.bootstrap.org_id
