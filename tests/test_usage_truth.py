"""Usage, alerts and recommendations tell the truth: exact traffic through the gateway (served, refused
and failed requests over a parent, its sub-key and grand-sub-key, and a key at its limit), then the same
numbers asserted on every surface: REST API, CLI, MCP tool and dashboard.

The traffic (all within a second, so within one rate-limit window):

    at-limit  (profile "five": 5/min, scope chats:create only)
        4 × chat gpt-test  → 200 served
        1 × chat error-model → 400 failed (admitted: it uses one of the 5)
        3 × chat gpt-test  → 429 rate_limited
        1 × embeddings embed-test → 403 insufficient_scope
        = 9 requests: 4 served, 4 refused, 1 failed
    parent    (standard, 60/min)                     2 served
      └ child (free, scope chats:create only)         5 served + 1 × 403 insufficient_scope (embeddings)
          └ grandchild (free)                         4 served + 1 failed (error-model)
        parent's traffic = 13 requests: 11 served, 1 refused, 1 failed; the parent alone: 2
        (the grandchild's requests count against the child's 10/min too: 5 + 5 fill it exactly)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import unescape
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from keyplane.app import KeyplaneApp
from keyplane.cli import app as cli_app
from keyplane.gateway.model_name import PARSED_BODY_BYTES, model_named
from tests.conftest import bearer, create_key
from tests.fake_upstream import FakeUpstream
from tests.processes import free_port, serve
from tests.test_gateway import CHAT, UPSTREAM_SECRET
from tests.test_mcp import mcp_session


@dataclass
class Traffic:
    at_limit: dict[str, Any]
    parent: dict[str, Any]
    child: dict[str, Any]
    grandchild: dict[str, Any]


async def _subkey(client: httpx.AsyncClient, admin: dict[str, str], parent_id: str, **fields: Any) -> dict[str, Any]:
    resp = await client.post(f"/api/v1/keys/{parent_id}/subkeys", json=fields, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["key"] | {"secret": resp.json()["secret"]}


async def _call(client: httpx.AsyncClient, secret: str, model: str, expected: int, embeddings: bool = False) -> None:
    if embeddings:
        resp = await client.post("/v1/embeddings", json={"input": "x", "model": model}, headers=bearer(secret))
    else:  # "model" after "messages", as the OpenAI SDK sends it
        resp = await client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "model": model},
                                 headers=bearer(secret))
    assert resp.status_code == expected, resp.text


@pytest.fixture
async def traffic(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> AsyncIterator[Traffic]:
    fake = FakeUpstream()
    async with serve(fake.app) as url:
        resp = await client.post("/api/v1/providers", headers=admin, json={
            "name": "local", "base_url": f"{url}/v1", "api_key": UPSTREAM_SECRET, "timeout_seconds": 5,
            "models": [{"name": "gpt-test", "input_per_mtok": 2.5, "output_per_mtok": 10},
                       {"name": "embed-test", "input_per_mtok": 0.1}, {"name": "error-model"}]})
        assert resp.status_code == 201, resp.text
        resp = await client.post("/api/v1/limit-profiles", headers=admin, json={
            "name": "five", "requests_per_minute": 5, "tokens_per_minute": 1000, "cost_per_day_usd": 1.0,
            "budget_per_month_usd": 30.0})
        assert resp.status_code == 201, resp.text
        at_limit, limited = await create_key(client, admin, name="at-limit", limit_profile="five",
                                             scopes=["chats:create"])
        for model, status in [("gpt-test", 200)] * 4 + [("error-model", 400)] + [("gpt-test", 429)] * 3:
            await _call(client, limited, model, status)
        await _call(client, limited, "embed-test", 403, embeddings=True)

        parent, parent_secret = await create_key(client, admin, name="parent", limit_profile="standard")
        child = await _subkey(client, admin, parent["id"], name="child", limit_profile="free",
                              scopes=["chats:create"])
        grandchild = await _subkey(client, admin, child["id"], name="grandchild", limit_profile="free")
        for _ in range(2):
            await _call(client, parent_secret, "gpt-test", 200)
        for _ in range(5):
            await _call(client, child["secret"], "gpt-test", 200)
        await _call(client, child["secret"], "embed-test", 403, embeddings=True)
        for _ in range(4):
            await _call(client, grandchild["secret"], "gpt-test", 200)
        await _call(client, grandchild["secret"], "error-model", 400)
    await app.kp.flush_usage()
    yield Traffic(at_limit, parent, child, grandchild)


async def _summary(client: httpx.AsyncClient, admin: dict[str, str], **params: Any) -> dict[str, Any]:
    resp = await client.get("/api/v1/usage/summary", params={"since": "1h", **params}, headers=admin)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _counts(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int, int, int]]:
    return {r["group"]: (r["requests"], r["served"], r["refused"], r["failed"]) for r in rows}


def _cli(app: KeyplaneApp, *args: str) -> Any:
    """Run the CLI against the app's store, in a thread (it runs its own event loop); JSON out."""
    s = app.kp.settings
    env = {"KEYPLANE_HOME": str(s.home)}
    for name in ("database_url", "database_schema", "master_key", "redis_url", "redis_namespace"):
        value = getattr(s, name)
        if value:
            env[f"KEYPLANE_{name.upper()}"] = str(value)
    result = CliRunner().invoke(cli_app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@contextlib.asynccontextmanager
async def _signed_in_dashboard(app: KeyplaneApp, token: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as ui:
        resp = await ui.post("/ui/login", data={"token": token})
        assert resp.status_code == 303, resp.text
        yield ui


def _table(html: str, table_id: str) -> dict[str, list[str]]:
    """Rows of an HTML table (by id) as first cell → the other cells, tags stripped."""
    body = re.search(rf'<table class="data" id="{table_id}">(.*?)</table>', html, re.S)
    assert body is not None, table_id
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S):
        cells = [unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def _facts(html: str, dl_id: str) -> dict[str, str]:
    body = re.search(rf'<dl class="facts" id="{dl_id}">(.*?)</dl>', html, re.S)
    assert body is not None, dl_id
    return dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", body.group(1)))


# -- items 2 and 6: one definition of a key's traffic; refusals keep their model -------------------------

async def test_a_keys_traffic_is_the_same_on_every_surface(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str, traffic: Traffic
) -> None:
    parent, child, grandchild = traffic.parent["id"], traffic.child["id"], traffic.grandchild["id"]
    # REST: the parent's traffic includes its sub-keys at any depth, by default; only itself when asked.
    by_key = await _summary(client, admin, group_by="key", key_id=parent)
    assert by_key["include_sub_keys"] is True and set(by_key["key_ids"]) == {parent, child, grandchild}
    assert _counts(by_key["data"]) == {child: (6, 5, 1, 0), grandchild: (5, 4, 0, 1), parent: (2, 2, 0, 0)}
    by_endpoint = await _summary(client, admin, group_by="endpoint", key_id=parent)
    assert _counts(by_endpoint["data"]) == {CHAT: (12, 11, 0, 1), "/v1/embeddings": (1, 0, 1, 0)}
    alone = await _summary(client, admin, group_by="key", key_id=parent, include_sub_keys="false")
    assert _counts(alone["data"]) == {parent: (2, 2, 0, 0)}
    # The refused embeddings call is counted under the model it named, not "(none)".
    by_model = await _summary(client, admin, group_by="model", key_id=parent)
    assert _counts(by_model["data"]) == {"gpt-test": (11, 11, 0, 0), "embed-test": (1, 0, 1, 0),
                                         "error-model": (1, 0, 0, 1)}
    assert by_model["data"][0]["error_rate"] == 0.0

    # CLI: the same figures.
    cli_rows = await asyncio.to_thread(_cli, app, "usage", "--since", "1h", "--group-by", "key", "--key", parent)
    assert _counts(cli_rows["data"]) == _counts(by_key["data"])
    cli_alone = await asyncio.to_thread(_cli, app, "usage", "--since", "1h", "--group-by", "key", "--key", parent,
                                        "--only-this-key")
    assert _counts(cli_alone["data"]) == {parent: (2, 2, 0, 0)}

    # MCP tool: the same figures.
    async with serve(app) as base, mcp_session(base + "/mcp", admin_token, "legacy") as session:
        result = await session.call_tool("keyplane_usage_summary", {"group_by": "model", "key_id": parent,
                                                                    "since": "1h"})
        assert _counts(result.structured_content["data"]) == _counts(by_model["data"])
        alone_tool = await session.call_tool("keyplane_usage_summary", {
            "group_by": "key", "key_id": parent, "since": "1h", "include_sub_keys": False})
        assert _counts(alone_tool.structured_content["data"]) == {parent: (2, 2, 0, 0)}

    # Dashboard: the parent's page counts the same 13 requests in its totals, per model, per endpoint, per key.
    async with _signed_in_dashboard(app, admin_token) as ui:
        html = (await ui.get(f"/ui/keys/{parent}", params={"since": "24h"})).text
    totals = _facts(html, "usage-totals")
    assert (totals["Requests"], totals["Served"], totals["Refused"], totals["Failed"]) == ("13", "11", "1", "1")
    assert totals["Error rate"] == "15.4%"
    assert _table(html, "by-model")["embed-test"][:5] == ["1", "0", "1", "0", "100.0%"]
    assert _table(html, "by-endpoint")[CHAT][:5] == ["12", "11", "0", "1", "8.3%"]
    assert _table(html, "by-key")[grandchild][:4] == ["5", "4", "0", "1"]
    # The chart's requests add up to the same word's count.
    timeline = re.search(r"<summary>Requests and errors per hour as a table</summary>(.*?)</table>", html, re.S)
    assert timeline is not None
    per_hour = [int(n) for n, _ in re.findall(r"<tr><td>[^<]*</td><td>(\d+)</td><td>(\d+)</td></tr>",
                                              timeline.group(1))]
    assert sum(per_hour) == 13
    # "Requests" is not used for the all-time admitted counter any more.
    assert "<dt>Requests</dt><dd>" not in html.split('id="usage-totals"')[0]


async def test_the_key_at_its_limit_counts_its_refusals_everywhere(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str, traffic: Traffic
) -> None:
    key = traffic.at_limit["id"]
    by_model = await _summary(client, admin, group_by="model", key_id=key)
    assert _counts(by_model["data"]) == {"gpt-test": (7, 4, 3, 0), "embed-test": (1, 0, 1, 0),
                                         "error-model": (1, 0, 0, 1)}
    assert "(none)" not in {r["group"] for r in by_model["data"]}
    events = (await client.get("/api/v1/usage/events", params={"key_id": key, "status": 429, "limit": 50},
                               headers=admin)).json()["data"]
    assert [e["model"] for e in events] == ["gpt-test"] * 3
    async with _signed_in_dashboard(app, admin_token) as ui:
        html = (await ui.get(f"/ui/keys/{key}", params={"since": "24h"})).text
    totals = _facts(html, "usage-totals")
    assert (totals["Requests"], totals["Served"], totals["Refused"], totals["Failed"]) == ("9", "4", "4", "1")
    assert _table(html, "by-model")["gpt-test"][:5] == ["7", "4", "3", "0", "42.9%"]


@pytest.mark.parametrize("padding", [100, PARSED_BODY_BYTES], ids=["parsed", "searched"])
def test_the_model_a_refused_body_names(padding: int) -> None:
    text = 'say "model": "fake" ' + "x" * padding  # quotes in content are escaped in JSON: never a match
    body = json.dumps({"messages": [{"role": "user", "content": text}], "model": "gpt-test"}).encode()
    assert model_named(body) == "gpt-test"
    # Too long: cut to the column when parsed; not taken at all when searched (the capture is bounded).
    too_long = model_named(json.dumps({"model": "m" * 300, "pad": "x" * padding}).encode())
    assert too_long == ("m" * 200 if padding < PARSED_BODY_BYTES else None)
    assert model_named(json.dumps({"model": "bad\u0000name", "pad": "x" * padding}).encode()) is None
    assert model_named(json.dumps({"model": 7, "pad": "x" * padding}).encode()) is None
    assert model_named(json.dumps(["model", "x" * padding]).encode()) is None
    assert model_named(b"") is None and model_named(b"not json") is None and model_named(b'{"model": "x') is None



def test_a_large_body_is_searched_at_both_ends_only() -> None:
    pad = "x" * PARSED_BODY_BYTES
    assert model_named(json.dumps({"model": "first", "messages": [{"content": pad}]}).encode()) == "first"
    assert model_named(json.dumps({"messages": [{"content": pad}], "model": "last"}).encode()) == "last"
    middle = {"messages": [{"content": pad}], "model": "middle", "tools": [{"description": pad}]}
    assert model_named(json.dumps(middle).encode()) is None  # bounded work: not looked for there


async def test_a_rate_limited_request_with_a_large_body_keeps_its_model(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    resp = await client.post("/api/v1/limit-profiles", headers=admin, json={"name": "one", "requests_per_minute": 1})
    assert resp.status_code == 201, resp.text
    _, secret = await create_key(client, admin, limit_profile="one")
    big = {"messages": [{"role": "user", "content": "x" * (PARSED_BODY_BYTES + 1)}], "model": "gpt-big"}
    statuses = [(await client.post(CHAT, json=big, headers=bearer(secret))).status_code for _ in range(2)]
    assert statuses[1] == 429  # the first was admitted (no provider serves it: 404, failed)
    await app.kp.flush_usage()
    events = (await client.get("/api/v1/usage/events", params={"status": 429}, headers=admin)).json()["data"]
    assert [e["model"] for e in events] == ["gpt-big"]


# -- items 1, 2 and 3: recommendations ---------------------------------------------------------------------

async def test_a_key_at_its_limit_is_not_told_to_loosen_it(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str, traffic: Traffic
) -> None:
    key = traffic.at_limit["id"]
    rec = (await client.get(f"/api/v1/keys/{key}/recommendation", headers=admin)).json()
    seen = rec["observed"]
    assert (seen["requests"], seen["served"], seen["refused"], seen["failed"], seen["demand"]) == (9, 4, 4, 1, 5)
    assert seen["refused_by_code"] == {"insufficient_scope": 1, "rate_limited": 3}
    assert rec["suggested_limits"]["requests_per_minute"] == 5  # not 60: the 429s were not demand
    assert rec["suggested_profile"] == "five" and rec["new_profile"] is None
    assert any("4 of 9 requests were refused (1 insufficient_scope, 3 rate_limited)" in line
               for line in rec["explanation"])
    # The CLI and the MCP tool say the same.
    cli_rec = await asyncio.to_thread(_cli, app, "keys", "recommend", key)
    assert cli_rec["observed"] == seen and cli_rec["suggested_profile"] == "five"
    async with serve(app) as base, mcp_session(base + "/mcp", admin_token, "legacy") as session:
        tool = (await session.call_tool("keyplane_recommend_limits", {"key_id": key})).structured_content
    assert tool["observed"] == seen and tool["suggested_limits"] == rec["suggested_limits"]


async def test_a_parents_recommendation_sees_its_sub_keys_and_fits_every_limit(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], traffic: Traffic
) -> None:
    parent = traffic.parent["id"]
    rec = (await client.get(f"/api/v1/keys/{parent}/recommendation", headers=admin)).json()
    seen = rec["observed"]
    assert (seen["requests"], seen["served"], seen["refused"], seen["failed"], seen["sub_keys"]) == (13, 11, 1, 1, 2)
    limits = rec["suggested_limits"]
    assert limits["requests_per_minute"] >= 10 and limits["tokens_per_minute"] and limits["cost_per_day_usd"]
    # No built-in profile caps tokens or cost: none fits all four suggested limits, so a new one is proposed.
    assert rec["suggested_profile"] is None and rec["new_profile"] == limits
    alone = (await client.get(f"/api/v1/keys/{parent}/recommendation", params={"include_sub_keys": "false"},
                              headers=admin)).json()
    assert alone["observed"]["requests"] == 2 and alone["key_ids"] == [parent]
    # A profile that sets every suggested limit is suggested; the looser "roomy" one and rpm-only ones are not.
    for name, rpm in (("roomy", 1000), ("snug", limits["requests_per_minute"])):
        resp = await client.post("/api/v1/limit-profiles", headers=admin, json={
            "name": name, "requests_per_minute": rpm, "tokens_per_minute": limits["tokens_per_minute"],
            "cost_per_day_usd": limits["cost_per_day_usd"], "budget_per_month_usd": limits["budget_per_month_usd"]})
        assert resp.status_code == 201, resp.text
    again = (await client.get(f"/api/v1/keys/{parent}/recommendation", headers=admin)).json()
    assert again["suggested_profile"] == "snug" and again["new_profile"] is None


# -- items 2, 4 and 5: alerts ----------------------------------------------------------------------------

async def test_an_alert_on_a_parent_counts_every_descendant_and_a_lost_webhook_is_recorded(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str, traffic: Traffic
) -> None:
    parent = traffic.parent["id"]
    nowhere = f"http://hook:s3cret-token@127.0.0.1:{free_port()}/hook/s3cret-path"  # nothing listens there
    resp = await client.post("/api/v1/alerts", headers=admin, json={
        "name": "parent-errors", "kind": "error_rate", "key_id": parent, "threshold": 0.1, "window_minutes": 10,
        "min_requests": 13, "webhook_url": nowhere})
    assert resp.status_code == 201, resp.text
    assert resp.json()["alert"]["last_delivery"] is None
    app.kp.alerts.retry_delays = (0.01, 0.01, 0.01)
    fired = await app.kp.alerts.evaluate()
    assert len(fired) == 1  # 13 requests (the grandchild's included), 2 errors: 15.4%
    audit = (await client.get("/api/v1/audit", params={"action": "alert.fire"}, headers=admin)).json()["data"]
    assert audit[0]["details"]["observed"] == {"requests": 13, "errors": 2, "value": 0.1538,
                                               "value_is": "errors / requests"}
    await asyncio.gather(*app.kp.alerts.deliveries)
    rule = (await client.get("/api/v1/alerts", headers=admin)).json()["data"][0]
    delivery = rule["last_delivery"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 4 and delivery["error"]
    failed = (await client.get("/api/v1/audit", params={"action": "alert.delivery_failed"}, headers=admin)).json()
    assert [(e["target"], e["principal"], e["details"]["attempts"]) for e in failed["data"]] == [
        (rule["id"], "system", 4)]
    assert failed["data"][0]["details"]["webhook_host"].startswith("127.0.0.1:")
    # Where it goes may carry a token (user:password, path): only the host and port are kept.
    assert "s3cret" not in json.dumps(failed) and "s3cret" not in json.dumps(
        (await client.get("/api/v1/audit", params={"action": "alert_rule.create"}, headers=admin)).json())
    async with _signed_in_dashboard(app, admin_token) as ui:
        html = (await ui.get("/ui/alerts")).text
    cell = re.search(r'<td class="delivery-failed">(.*?)</td>', html, re.S)
    assert cell is not None and "failed" in cell.group(1) and "after 4 attempts" in cell.group(1)
    assert "s3cret" not in html
    assert (await client.get("/api/v1/audit/verify", headers=admin)).json()["ok"]


async def test_a_spike_payload_says_what_each_number_is(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, _ = await create_key(client, admin)
    await client.post("/api/v1/alerts", headers=admin, json={
        "name": "spike", "kind": "spike", "key_id": key["id"], "threshold": 5, "window_minutes": 60,
        "min_requests": 10, "webhook_url": f"http://127.0.0.1:{free_port()}/hook"})
    assert app.bootstrap is not None
    now = datetime.now(UTC)

    def event(at: datetime) -> dict[str, Any]:
        return {"org_id": app.bootstrap.org_id, "key_id": key["id"], "parent_id": None, "provider": "p",  # type: ignore[union-attr]
                "model": "m", "endpoint": CHAT, "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1,
                "cost_usd": 0.0, "latency_ms": 1.0, "client_ip": None, "cost_center": None, "environment": None,
                "time": at}

    # 12 requests in the day before the window (0.5 a window: below the floor of 1), 62 in the window.
    await app.kp.usage.insert([event(now - timedelta(hours=h)) for h in range(2, 14)]
                              + [event(now - timedelta(minutes=5)) for _ in range(62)])
    app.kp.alerts.retry_delays = ()
    assert len(await app.kp.alerts.evaluate()) == 1
    audit = (await client.get("/api/v1/audit", params={"action": "alert.fire"}, headers=admin)).json()["data"]
    observed = audit[0]["details"]["observed"]
    assert observed == {"requests": 62, "baseline_requests_per_window": 0.5, "baseline_used": 1.0,
                        "baseline_floored": True, "value": 62.0, "value_is": "requests / baseline_used"}
    await asyncio.gather(*app.kp.alerts.deliveries)


async def test_a_budget_alert_on_a_parent_counts_a_grand_sub_keys_spend(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    resp = await client.post("/api/v1/limit-profiles", headers=admin,
                             json={"name": "capped", "budget_per_month_usd": 1.0})
    assert resp.status_code == 201, resp.text
    parent, _ = await create_key(client, admin, name="parent", limit_profile="capped")
    child = await _subkey(client, admin, parent["id"], name="child")
    grandchild = await _subkey(client, admin, child["id"], name="grandchild")
    assert app.bootstrap is not None
    await app.kp.usage.insert([{
        "org_id": app.bootstrap.org_id, "key_id": grandchild["id"], "parent_id": child["id"], "provider": "p",
        "model": "m", "endpoint": CHAT, "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1,
        "cost_usd": 0.9, "latency_ms": 1.0, "client_ip": None, "cost_center": None, "environment": None,
        "time": datetime.now(UTC)}])
    # What a restarted process seeds the parent's budget with, and what the budget alert sees.
    _, month = await app.kp.usage.spent_so_far(parent["id"])
    assert month == pytest.approx(0.9)
    resp = await client.post("/api/v1/alerts", headers=admin, json={
        "name": "parent-budget", "kind": "budget", "key_id": parent["id"], "threshold": 0.8,
        "webhook_url": f"http://127.0.0.1:{free_port()}/hook"})
    assert resp.status_code == 201, resp.text
    app.kp.alerts.retry_delays = ()
    assert len(await app.kp.alerts.evaluate()) == 1
    audit = (await client.get("/api/v1/audit", params={"action": "alert.fire"}, headers=admin)).json()["data"]
    assert audit[0]["details"]["observed"]["spent_usd"] == pytest.approx(0.9)
    await asyncio.gather(*app.kp.alerts.deliveries)


async def test_the_dashboard_chart_adds_up_to_the_windows_requests(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str
) -> None:
    key, _ = await create_key(client, admin, name="edges")
    assert app.bootstrap is not None
    now = datetime.now(UTC)
    # One request just inside the 24-hour window (before the first whole hour of it), one now.
    await app.kp.usage.insert([{
        "org_id": app.bootstrap.org_id, "key_id": key["id"], "parent_id": None, "provider": "p", "model": "m",
        "endpoint": CHAT, "status": 200, "code": "ok", "input_tokens": 1, "output_tokens": 1, "cost_usd": 0.0,
        "latency_ms": 1.0, "client_ip": None, "cost_center": None, "environment": None, "time": at}
        for at in (now - timedelta(hours=24) + timedelta(seconds=30), now)])
    async with _signed_in_dashboard(app, admin_token) as ui:
        html = (await ui.get(f"/ui/keys/{key['id']}", params={"since": "24h"})).text
    assert _facts(html, "usage-totals")["Requests"] == "2"
    timeline = re.search(r"<summary>Requests and errors per hour as a table</summary>(.*?)</table>", html, re.S)
    assert timeline is not None
    assert sum(int(n) for n in re.findall(r"<tr><td>[^<]*</td><td>(\d+)</td>", timeline.group(1))) == 2


async def test_flush_usage_waits_for_a_flush_already_writing(app: KeyplaneApp) -> None:
    """Every count above is read right after flush_usage(): it must not return while the periodic flush
    that took the events first is still writing them (seen as empty summaries on a loaded PostgreSQL)."""
    writing, written = asyncio.Event(), []
    real_insert = app.kp.usage.insert

    async def slow_insert(batch: list[dict[str, Any]]) -> None:
        writing.set()
        await asyncio.sleep(0.2)
        await real_insert(batch)
        written.extend(batch)

    app.kp.usage.insert = slow_insert  # type: ignore[method-assign]
    app.kp.usage_buffer.add({"org_id": None, "key_id": None, "parent_id": None, "provider": None, "model": None,
                             "endpoint": "/v1/models", "status": 401, "code": "missing_bearer", "input_tokens": 0,
                             "output_tokens": 0, "cost_usd": 0.0, "latency_ms": 1.0, "client_ip": None,
                             "cost_center": None, "environment": None, "time": datetime.now(UTC)})
    periodic = asyncio.create_task(app.kp.flush_usage())
    await writing.wait()
    await app.kp.flush_usage()
    assert len(written) == 1
    await periodic
