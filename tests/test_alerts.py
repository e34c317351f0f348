"""Alerts: budget thresholds, error rates and spikes, delivered as signed webhooks with retries, audited."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, create_key
from tests.test_gateway import serve


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.calls.append({"headers": dict(request.headers), "body": await request.body()})
        return Response(status_code=500 if len(self.calls) <= self.fail_first else 204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver(fail_first=0)
    async with serve(r.app) as url:
        yield r, f"{url}/hook"


def event(org_id: str, key_id: str, at: datetime, status: int = 200, cost: float = 0.0) -> dict[str, Any]:
    return {"org_id": org_id, "key_id": key_id, "parent_id": None, "provider": "p", "model": "m",
            "endpoint": "/v1/chat/completions", "status": status, "code": "ok" if status < 400 else "upstream_error",
            "input_tokens": 1, "output_tokens": 1, "cost_usd": cost, "latency_ms": 5.0, "client_ip": None,
            "cost_center": None, "environment": None, "time": at}


async def wait_for_calls(r: Receiver, n: int) -> None:
    for _ in range(200):
        if len(r.calls) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {n} webhook calls, got {len(r.calls)}")


async def test_error_rate_alert_is_signed_delivered_audited_and_cooled_down(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], receiver: tuple[Receiver, str]
) -> None:
    r, url = receiver
    key, _ = await create_key(client, admin)
    resp = await client.post("/api/v1/alerts", headers=admin, json={
        "name": "errors", "kind": "error_rate", "key_id": key["id"], "threshold": 0.2, "window_minutes": 10,
        "min_requests": 10, "webhook_url": url})
    assert resp.status_code == 201, resp.text
    secret = resp.json()["signing_secret"]
    assert secret.startswith("whsec_") and secret not in (await client.get("/api/v1/alerts", headers=admin)).text
    org = app.bootstrap.org_id  # type: ignore[union-attr]
    now = datetime.now(UTC)
    await app.kp.usage.insert([event(org, key["id"], now - timedelta(minutes=1), 200) for _ in range(16)])
    assert await app.kp.alerts.evaluate() == []  # 0% errors
    await app.kp.usage.insert([event(org, key["id"], now - timedelta(minutes=1), 502) for _ in range(4)])
    fired = await app.kp.alerts.evaluate()
    assert len(fired) == 1
    await wait_for_calls(r, 1)
    call = r.calls[0]
    stamp = call["headers"]["x-keyplane-timestamp"]
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + call["body"], hashlib.sha256).hexdigest()
    assert call["headers"]["x-keyplane-signature"] == f"sha256={expected}"
    payload = json.loads(call["body"])
    assert payload["kind"] == "error_rate" and payload["observed"] == {"requests": 20, "errors": 4, "value": 0.2,
                                                                  "value_is": "errors / requests"}
    audit = (await client.get("/api/v1/audit", params={"action": "alert.fire"}, headers=admin)).json()["data"]
    assert len(audit) == 1 and audit[0]["principal"] == "system" and audit[0]["target"] == fired[0]
    assert await app.kp.alerts.evaluate() == []  # within the cooldown
    assert (await client.get("/api/v1/audit/verify", headers=admin)).json()["ok"]


async def test_budget_threshold_alert(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], receiver: tuple[Receiver, str]
) -> None:
    r, url = receiver
    await client.post("/api/v1/limit-profiles", json={"name": "capped", "budget_per_month_usd": 1.0}, headers=admin)
    key, _ = await create_key(client, admin, limit_profile="capped")
    resp = await client.post("/api/v1/alerts", headers=admin, json={
        "name": "budget80", "kind": "budget", "key_id": key["id"], "threshold": 0.8, "webhook_url": url})
    assert resp.status_code == 201
    org = app.bootstrap.org_id  # type: ignore[union-attr]
    await app.kp.usage.insert([event(org, key["id"], datetime.now(UTC), cost=0.79)])
    assert await app.kp.alerts.evaluate() == []
    await app.kp.usage.insert([event(org, key["id"], datetime.now(UTC), cost=0.02)])
    assert len(await app.kp.alerts.evaluate()) == 1
    await wait_for_calls(r, 1)
    observed = json.loads(r.calls[0]["body"])["observed"]
    assert observed["limit"] == "budget_per_month_usd" and observed["value"] == 0.81


async def test_spike_against_the_trailing_baseline(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], receiver: tuple[Receiver, str]
) -> None:
    r, url = receiver
    key, _ = await create_key(client, admin)
    await client.post("/api/v1/alerts", headers=admin, json={
        "name": "spike", "kind": "spike", "key_id": key["id"], "threshold": 5, "window_minutes": 60,
        "min_requests": 10, "webhook_url": url})
    org = app.bootstrap.org_id  # type: ignore[union-attr]
    now = datetime.now(UTC)
    # A steady 4 requests an hour over the previous day, then 30 in the last hour.
    baseline = [event(org, key["id"], now - timedelta(hours=h, minutes=30)) for h in range(2, 25) for _ in range(4)]
    await app.kp.usage.insert(baseline)
    await app.kp.usage.insert([event(org, key["id"], now - timedelta(minutes=5)) for _ in range(12)])
    assert await app.kp.alerts.evaluate() == []  # 12 / ~3.8 < 5
    await app.kp.usage.insert([event(org, key["id"], now - timedelta(minutes=5)) for _ in range(18)])
    assert len(await app.kp.alerts.evaluate()) == 1
    await wait_for_calls(r, 1)
    assert json.loads(r.calls[0]["body"])["observed"]["requests"] == 30


async def test_delivery_retries_until_the_receiver_accepts(app: KeyplaneApp) -> None:
    r = Receiver(fail_first=2)
    app.kp.alerts.retry_delays = (0.05, 0.05, 0.05)
    async with serve(r.app) as url:
        assert await app.kp.alerts.deliver(f"{url}/hook", "whsec_x", {"rule_id": "alr_x"}) is True
    assert [c["headers"]["x-keyplane-attempt"] for c in r.calls] == ["1", "2", "3"]
    gone = Receiver(fail_first=99)
    async with serve(gone.app) as url:
        assert await app.kp.alerts.deliver(f"{url}/hook", "whsec_x", {"rule_id": "alr_x"}) is False
    assert len(gone.calls) == 4


async def test_bad_alert_rules(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, _ = await create_key(client, admin)
    base = {"name": "x", "kind": "error_rate", "threshold": 0.5, "webhook_url": "http://127.0.0.1:9/hook"}
    assert_error(await client.post("/api/v1/alerts", json={**base, "kind": "budget"}, headers=admin), 400,
                 "invalid_request")
    no_budget = {**base, "kind": "budget", "key_id": key["id"]}
    assert_error(await client.post("/api/v1/alerts", json=no_budget, headers=admin), 400, "invalid_request")
    assert_error(await client.post("/api/v1/alerts", json={**base, "threshold": 2}, headers=admin), 400,
                 "invalid_request")
    assert_error(await client.post("/api/v1/alerts", json={**base, "key_id": "key_nope"}, headers=admin), 404,
                 "not_found")
    assert_error(await client.post("/api/v1/alerts", json={**base, "webhook_url": "mailto:x"}, headers=admin), 422,
                 "invalid_request")
    assert_error(await client.post("/api/v1/alerts", json={**base, "kind": "weather"}, headers=admin), 422,
                 "invalid_request")
    created = await client.post("/api/v1/alerts", json=base, headers=admin)
    assert created.status_code == 201
    assert_error(await client.post("/api/v1/alerts", json=base, headers=admin), 409, "conflict")
    rule_id = created.json()["alert"]["id"]
    assert (await client.delete(f"/api/v1/alerts/{rule_id}", headers=admin)).status_code == 200
    assert_error(await client.delete(f"/api/v1/alerts/{rule_id}", headers=admin), 404, "not_found")


async def test_a_window_ending_on_a_minute_boundary_counts_the_minute_it_starts(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    """Alert windows read minute rollups; evaluated in the first second of a minute, the requests of that
    minute still count (the window's end takes the minute it starts)."""
    from types import SimpleNamespace

    _, secret = await create_key(client, admin, scopes=["models:read"])
    for _ in range(3):
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})).status_code == 200
    await app.kp.flush_usage()
    assert app.bootstrap is not None
    rule = SimpleNamespace(org_id=app.bootstrap.org_id, key_id=None, mcp_server=None)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)  # the minute the requests were made in
    total, _errors = await app.kp.alerts._count(rule, minute - timedelta(minutes=5), minute)  # type: ignore[arg-type]
    assert total >= 3
