"""The MCP server at /mcp, over real HTTP, with the official Python SDK's client (and raw JSON-RPC)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from keyplane.app import KeyplaneApp
from keyplane.domain import scopes as scope_rules
from tests.conftest import assert_error, bearer, create_key, create_sa, verify
from tests.processes import serve

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def mcp_session(url: str, token: str, mode: str = "auto") -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as session:
            yield session


@contextlib.asynccontextmanager
async def app_with(settings_factory: Any, scopes: list[str], **settings: Any) -> AsyncIterator[tuple[str, str]]:
    """A running app with these settings, served over HTTP: (base URL, token of a new account with ``scopes``)."""
    application = KeyplaneApp(settings_factory(**settings))
    boot = await application.startup()
    try:
        async with serve(application) as base:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://kp") as rest:
                _, token = await create_sa(rest, bearer(boot.admin_token or ""), scopes)
            yield base, token
    finally:
        await application.shutdown()


@pytest.fixture
async def mcp_url(app: KeyplaneApp) -> AsyncIterator[str]:
    async with serve(app) as base:
        yield base + "/mcp"


def initialize(version: str, id_: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw-test", "version": "1"}}}


def tool_call(name: str, arguments: dict[str, Any], id_: int = 2) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


# -- transport and protocol versions ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
async def test_every_tool_is_listed_with_schemas_and_annotations(mcp_url: str, admin_token: str, mode: str) -> None:
    async with mcp_session(mcp_url, admin_token, mode) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        if mode == "legacy":
            assert session.protocol_version == "2025-11-25"
        elif mode == "2026-07-28":
            assert session.protocol_version == "2026-07-28"
    assert set(tools) == set(scope_rules.MCP_TOOL_SCOPES)
    assert all(name.startswith("keyplane_") for name in tools)
    create = tools["keyplane_create_virtual_key"]
    assert create.input_schema["required"] == ["name"]
    assert create.output_schema is not None and create.output_schema["type"] == "object"
    assert create.annotations and create.annotations.read_only_hint is False
    assert tools["keyplane_revoke_virtual_key"].annotations.destructive_hint is True
    for read_only in ("keyplane_list_virtual_keys", "keyplane_usage_summary", "keyplane_audit_events",
                      "keyplane_list_limit_profiles", "keyplane_recommend_limits"):
        assert tools[read_only].annotations.read_only_hint is True


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
async def test_handshake_versions_keep_a_session_across_requests(mcp_url: str, admin: dict[str, str],
                                                                 version: str) -> None:
    async with httpx.AsyncClient(headers={**admin, **ACCEPT}) as http:
        resp = await http.post(mcp_url, json=initialize(version))
        assert resp.status_code == 200, resp.text
        assert f'"protocolVersion":"{version}"' in resp.text.replace(" ", "")
        session_id = resp.headers["mcp-session-id"]
        headers = {"mcp-session-id": session_id, "mcp-protocol-version": version}
        resp = await http.post(mcp_url, headers=headers,
                               json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert resp.status_code == 202
        resp = await http.post(mcp_url, headers=headers, json=tool_call("keyplane_list_limit_profiles", {}))
        assert resp.status_code == 200 and '"standard"' in resp.text
        # A request naming an unknown session is refused by the SDK; the real one still works.
        resp = await http.post(mcp_url, headers={**headers, "mcp-session-id": "nope"},
                               json=tool_call("keyplane_list_limit_profiles", {}))
        assert resp.status_code == 404
        resp = await http.post(mcp_url, headers=headers, json=tool_call("keyplane_list_limit_profiles", {}, 3))
        assert resp.status_code == 200


async def test_two_clients_at_once_each_act_as_themselves(mcp_url: str, client: httpx.AsyncClient,
                                                          admin: dict[str, str]) -> None:
    sa_a, token_a = await create_sa(client, admin, ["virtual_keys:read", "virtual_keys:create"], name="agent-a")
    sa_b, token_b = await create_sa(client, admin, ["virtual_keys:read", "virtual_keys:create"], name="agent-b")

    async def agent(token: str, label: str) -> list[str]:
        async with mcp_session(mcp_url, token, "legacy") as session:
            ids = []
            for i in range(5):
                result = await session.call_tool("keyplane_create_virtual_key", {"name": f"{label}-{i}"})
                assert not result.is_error, result
                ids.append(result.structured_content["key"]["id"])
                await session.list_tools()
            return ids

    ids_a, ids_b = await asyncio.gather(agent(token_a, "a"), agent(token_b, "b"))
    audit = (await client.get("/api/v1/audit", params={"action": "keyplane_create_virtual_key", "limit": 50},
                              headers=admin)).json()["data"]
    by_target = {e["target"]: e["principal"] for e in audit}
    assert {by_target[i] for i in ids_a} == {sa_a["id"]}
    assert {by_target[i] for i in ids_b} == {sa_b["id"]}
    assert (await client.get("/api/v1/audit/verify", headers=admin)).json()["ok"] is True


# -- authentication and scopes -----------------------------------------------------------------------

async def test_missing_unknown_and_revoked_tokens_get_401_with_the_right_challenge(
        mcp_url: str, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    async with httpx.AsyncClient(headers=ACCEPT) as http:
        resp = await http.post(mcp_url, json=initialize("2025-11-25"))
        assert_error(resp, 401, "missing_bearer")
        assert resp.headers["www-authenticate"] == 'Bearer realm="keyplane"'
        assert "resource_metadata" not in resp.headers["www-authenticate"]

        resp = await http.post(mcp_url, json=initialize("2025-11-25"),
                               headers=bearer("mcp_sa_" + "A" * 37))
        assert_error(resp, 401, "invalid_api_key")
        assert resp.headers["www-authenticate"] == 'Bearer realm="keyplane", error="invalid_token"'

        sa, token = await create_sa(client, admin, ["virtual_keys:read"])
        resp = await http.post(mcp_url, json=initialize("2025-11-25"), headers=bearer(token))
        assert resp.status_code == 200
        assert (await client.delete(f"/api/v1/service-accounts/{sa['id']}", headers=admin)).status_code == 200
        resp = await http.post(mcp_url, json=initialize("2025-11-25"), headers=bearer(token))
        assert_error(resp, 401, "invalid_api_key")
        # GET (the SSE stream) and DELETE (end session) are guarded too.
        assert (await http.get(mcp_url)).status_code == 401
        assert (await http.delete(mcp_url)).status_code == 401
    # No OAuth discovery is advertised while keyplane has no authorization server.
    async with httpx.AsyncClient() as http:
        base = mcp_url.removesuffix("/mcp")
        assert (await http.get(base + "/.well-known/oauth-protected-resource")).status_code == 404
        assert (await http.get(base + "/.well-known/oauth-protected-resource/mcp")).status_code == 404


async def test_a_token_revoked_mid_session_is_cut_off_on_its_next_request(
        mcp_url: str, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    sa, token = await create_sa(client, admin, ["virtual_keys:read", "virtual_keys:create"])
    async with mcp_session(mcp_url, token, "legacy") as session:
        created = await session.call_tool("keyplane_create_virtual_key", {"name": "before-revoke"})
        assert not created.is_error
        assert (await client.delete(f"/api/v1/service-accounts/{sa['id']}", headers=admin)).status_code == 200
        with pytest.raises(Exception):  # noqa: B017 (the SDK surfaces the 401 as a transport error)
            await session.call_tool("keyplane_list_virtual_keys", {})
    # Its past entries remain and the chain verifies.
    audit = (await client.get("/api/v1/audit", params={"principal": sa["id"]}, headers=admin)).json()["data"]
    assert [e["action"] for e in audit] == ["keyplane_create_virtual_key"]
    assert (await client.get("/api/v1/audit/verify", headers=admin)).json()["ok"] is True


async def test_tools_list_shows_only_callable_tools_and_calls_without_the_scope_get_403(
        mcp_url: str, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, token = await create_sa(client, admin, ["virtual_keys:read", "usage:read"])
    async with mcp_session(mcp_url, token, "legacy") as session:
        names = {t.name for t in (await session.list_tools()).tools}
    assert names == {"keyplane_list_virtual_keys", "keyplane_usage_summary", "keyplane_recommend_limits",
                     "keyplane_key_spend"}

    async with httpx.AsyncClient(headers={**bearer(token), **ACCEPT}) as http:
        resp = await http.post(mcp_url, json=tool_call("keyplane_create_virtual_key", {"name": "x"}))
        err = assert_error(resp, 403, "insufficient_scope")
        assert err["scope"] == "virtual_keys:create" and "virtual_keys:create" in err["message"]
        assert resp.headers["www-authenticate"] == \
            'Bearer realm="keyplane", error="insufficient_scope", scope="virtual_keys:create"'
        # On the 2026-07-28 protocol the tool name also travels in the Mcp-Name header.
        resp = await http.post(mcp_url, headers={"mcp-name": "keyplane_audit_events"},
                               json=tool_call("keyplane_audit_events", {}))
        assert assert_error(resp, 403, "insufficient_scope")["scope"] == "audit:read"
    keys = (await client.get("/api/v1/keys", headers=admin)).json()["data"]
    assert keys == []


async def test_list_all_tools_setting_shows_every_tool(settings_factory: Any) -> None:
    async with app_with(settings_factory, ["usage:read"], mcp_list_all_tools=True) as (base, token), \
            mcp_session(base + "/mcp", token, "legacy") as session:
        assert len((await session.list_tools()).tools) == len(scope_rules.MCP_TOOL_SCOPES)
        # Shown is not allowed: the call is still refused.
        with pytest.raises(Exception):  # noqa: B017
            await session.call_tool("keyplane_create_virtual_key", {"name": "x"})


async def test_query_token_is_off_by_default_and_on_by_setting_and_never_logged(
        settings_factory: Any, mcp_url: str, admin_token: str, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    async with httpx.AsyncClient(headers=ACCEPT) as http:
        resp = await http.post(f"{mcp_url}?api_key={admin_token}", json=initialize("2025-11-25"))
        err = assert_error(resp, 401, "missing_bearer")
        assert "KEYPLANE_MCP_QUERY_TOKEN" in err["message"]

    caplog.set_level(logging.DEBUG)
    application = KeyplaneApp(settings_factory(mcp_query_token=True))
    await application.startup()
    try:
        async with serve(application) as base:
            url = f"{base}/mcp?api_key={admin_token}"
            async with httpx2.AsyncClient() as http, Client(streamable_http_client(url, http_client=http),
                                                           mode="legacy") as session:
                result = await session.call_tool("keyplane_list_limit_profiles", {})
                assert not result.is_error
                assert {p["name"] for p in result.structured_content["data"]} >= {"free", "standard"}
            async with httpx.AsyncClient(headers=ACCEPT) as http:
                resp = await http.post(f"{base}/mcp?api_key=mcp_sa_{'B' * 37}", json=initialize("2025-11-25"))
                assert_error(resp, 401, "invalid_api_key")
    finally:
        await application.shutdown()
    captured = capsys.readouterr()
    client_side = ("httpx", "httpcore", "mcp.client")  # the test's own client logs the URL it was given
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith(client_side)]
    assert len(server_lines) > 10  # the server did log (at DEBUG) while serving these requests
    assert admin_token not in "\n".join(server_lines) + captured.out + captured.err


async def test_host_and_origin_are_checked_against_dns_rebinding(mcp_url: str, admin: dict[str, str]) -> None:
    async with httpx.AsyncClient(headers={**admin, **ACCEPT}) as http:
        resp = await http.post(mcp_url, json=initialize("2025-11-25"), headers={"Host": "evil.example"})
        assert resp.status_code == 421
        resp = await http.post(mcp_url, json=initialize("2025-11-25"), headers={"Origin": "http://evil.example"})
        assert resp.status_code == 403
        resp = await http.post(mcp_url, json=initialize("2025-11-25"), headers={"Origin": "http://localhost:3000"})
        assert resp.status_code == 200


async def test_malformed_json_rpc_gets_a_json_rpc_error_and_the_server_keeps_serving(
        mcp_url: str, admin: dict[str, str]) -> None:
    async with httpx.AsyncClient(headers={**admin, **ACCEPT}) as http:
        resp = await http.post(mcp_url, content=b'{"jsonrpc": "2.0", "id": 1, "method": ')
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == -32700  # parse error
        resp = await http.post(mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": 42})
        assert resp.status_code == 400 and "error" in resp.json()
        resp = await http.post(mcp_url, json=[1, 2, 3])
        assert resp.status_code == 400
        resp = await http.post(mcp_url, json=initialize("2025-11-25"))
        assert resp.status_code == 200


# -- the tools ------------------------------------------------------------------------------------------

async def test_key_lifecycle_through_tools(mcp_url: str, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, agent = await create_sa(client, admin, sorted(scope_rules.AGENT_DEFAULT_SCOPES))
    async with mcp_session(mcp_url, agent, "legacy") as session:
        created = await session.call_tool("keyplane_create_virtual_key", {
            "name": "feature-x", "cost_center": "search", "environment": "staging",
            "scopes": ["chats:create"], "limit_profile": "free", "metadata": {"ticket": "KP-1"}})
        assert not created.is_error, created.content
        body = created.structured_content
        key, secret = body["key"], body["secret"]
        assert secret.startswith("mcp_sk_") and "shown once" in body["warning"]
        assert key["scopes"] == ["chats:create"] and key["limit_profile"] == "free"
        assert (await verify(client, admin, secret))["valid"] is True

        await session.call_tool("keyplane_create_virtual_key", {"name": "other", "cost_center": "ads"})
        listed = await session.call_tool("keyplane_list_virtual_keys", {"cost_center": "search"})
        assert [k["id"] for k in listed.structured_content["data"]] == [key["id"]]
        assert "secret" not in listed.structured_content["data"][0]
        by_name = await session.call_tool("keyplane_list_virtual_keys", {"name": "other"})
        assert [k["name"] for k in by_name.structured_content["data"]] == ["other"]
        staged = await session.call_tool("keyplane_list_virtual_keys", {"environment": "staging",
                                                                         "status": "enabled"})
        assert len(staged.structured_content["data"]) == 1

        sub = await session.call_tool("keyplane_create_virtual_key", {"name": "sub", "parent_id": key["id"]})
        assert not sub.is_error and sub.structured_content["key"]["parent_id"] == key["id"]

        rotated = await session.call_tool("keyplane_rotate_virtual_key", {"key_id": key["id"]})
        new_secret = rotated.structured_content["secret"]
        assert new_secret != secret
        assert (await verify(client, admin, secret))["valid"] is False
        assert (await verify(client, admin, new_secret))["valid"] is True

        revoked = await session.call_tool("keyplane_revoke_virtual_key", {"key_id": key["id"]})
        assert revoked.structured_content["status"] == "disabled"
        refused = await verify(client, admin, new_secret)  # propagates at once
        assert refused["valid"] is False and refused["code"] == "DISABLED"
        sub_secret = sub.structured_content["secret"]
        assert (await verify(client, admin, sub_secret))["valid"] is False  # the parent cuts it off

        deleted = await session.call_tool("keyplane_revoke_virtual_key", {"key_id": key["id"], "mode": "delete"})
        assert deleted.is_error and "key_recently_used" in deleted.content[0].text  # used minutes ago
        deleted = await session.call_tool("keyplane_revoke_virtual_key",
                                          {"key_id": key["id"], "mode": "delete", "force": True})
        assert not deleted.is_error, deleted.content
        listed = await session.call_tool("keyplane_list_virtual_keys", {"cost_center": "search"})
        assert listed.structured_content["data"] == []


async def test_no_escalation_through_tools(mcp_url: str, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, agent = await create_sa(client, admin, ["virtual_keys:create", "chats:create"])
    async with mcp_session(mcp_url, agent, "legacy") as session:
        result = await session.call_tool("keyplane_create_virtual_key", {"name": "x", "scopes": ["embeddings:create"]})
        assert result.is_error and "cannot grant" in result.content[0].text
        result = await session.call_tool("keyplane_create_virtual_key", {"name": "x", "scopes": ["admin"]})
        assert result.is_error
    assert (await client.get("/api/v1/keys", headers=admin)).json()["data"] == []


async def test_another_organizations_keys_usage_and_audit_do_not_exist_for_tools(
        mcp_url: str, app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    acme = await app.kp.organizations.create("acme")
    assert acme.admin_token
    mine, my_secret = await create_key(client, admin, name="mine")
    async with mcp_session(mcp_url, acme.admin_token, "legacy") as theirs:
        listed = await theirs.call_tool("keyplane_list_virtual_keys", {})
        assert not listed.is_error and listed.structured_content["data"] == []
        for tool, arguments in (("keyplane_revoke_virtual_key", {"key_id": mine["id"]}),
                                ("keyplane_revoke_virtual_key", {"key_id": mine["id"], "mode": "delete"}),
                                ("keyplane_rotate_virtual_key", {"key_id": mine["id"]}),
                                ("keyplane_recommend_limits", {"key_id": mine["id"]})):
            refused = await theirs.call_tool(tool, arguments)
            assert refused.is_error and "not_found" in refused.content[0].text, (tool, refused.content)
        usage = await theirs.call_tool("keyplane_usage_summary", {"group_by": "key"})
        assert not usage.is_error and mine["id"] not in str(usage.structured_content)
        await app.kp.tool_calls.flush()
        audit = await theirs.call_tool("keyplane_audit_events", {})
        assert not audit.is_error
        # acme's trail holds its own refused attempts (naming the id it tried), nothing of the other org's.
        about_mine = [e for e in audit.structured_content["data"] if mine["id"] in str(e)]
        assert len(about_mine) == 4
        assert all(e["details"]["outcome"] == "refused" and "not_found" in e["details"]["reason"] for e in about_mine)
    assert (await verify(client, admin, my_secret))["valid"]  # untouched


async def test_tool_errors_are_tool_results_and_the_session_carries_on(mcp_url: str, admin_token: str) -> None:
    async with mcp_session(mcp_url, admin_token, "legacy") as session:
        missing = await session.call_tool("keyplane_revoke_virtual_key", {"key_id": "key_doesnotexist"})
        assert missing.is_error and "not_found" in missing.content[0].text
        bad = await session.call_tool("keyplane_create_virtual_key", {"name": "x", "expires_in": -5})
        assert bad.is_error
        bad = await session.call_tool("keyplane_create_virtual_key", {"name": "x", "ip_allowlist": ["not-a-cidr"]})
        assert bad.is_error and "not-a-cidr" in bad.content[0].text
        bad = await session.call_tool("keyplane_usage_summary", {"since": "yesterday-ish"})
        assert bad.is_error and "since" in bad.content[0].text
        bad = await session.call_tool("keyplane_create_virtual_key", {})
        assert bad.is_error
        unknown = await session.call_tool("keyplane_does_not_exist", {})
        assert unknown.is_error
        ok = await session.call_tool("keyplane_list_limit_profiles", {})
        assert not ok.is_error


async def test_usage_recommendations_and_audit_tools(mcp_url: str, app: KeyplaneApp, client: httpx.AsyncClient,
                                                     admin: dict[str, str], admin_token: str) -> None:
    key, _ = await create_key(client, admin, name="busy", cost_center="search")
    assert app.bootstrap is not None
    org_id = app.bootstrap.org_id
    now = datetime.now(UTC)
    await app.kp.usage.insert([
        {"org_id": org_id, "time": now, "key_id": key["id"], "parent_id": None, "provider": "openai", "model": m,
         "endpoint": "/v1/chat/completions", "status": status, "code": "ok" if status == 200 else "upstream_error",
         "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.001, "latency_ms": 12.0, "client_ip": "127.0.0.1",
         "cost_center": "search", "environment": None}
        for m, status in (("gpt-a", 200), ("gpt-a", 200), ("gpt-b", 500))])
    async with mcp_session(mcp_url, admin_token, "legacy") as session:
        summary = (await session.call_tool("keyplane_usage_summary", {"group_by": "model"})).structured_content
        assert {(g["group"], g["requests"], g["errors"]) for g in summary["data"]} == {("gpt-a", 2, 0), ("gpt-b", 1, 1)}
        by_cc = (await session.call_tool("keyplane_usage_summary", {"group_by": "cost_center", "since": "1h"}))
        assert by_cc.structured_content["data"][0]["group"] == "search"
        by_key = (await session.call_tool("keyplane_usage_summary", {"group_by": "key", "key_id": key["id"]}))
        assert by_key.structured_content["data"][0]["requests"] == 3
        rec = (await session.call_tool("keyplane_recommend_limits", {"key_id": key["id"]})).structured_content
        assert rec["key_id"] == key["id"] and rec["observed"]["requests"] == 3 and rec["suggested_limits"]
        profiles = (await session.call_tool("keyplane_list_limit_profiles", {})).structured_content["data"]
        assert {"free", "standard", "professional"} <= {p["name"] for p in profiles}
        events = (await session.call_tool("keyplane_audit_events", {"action": "virtual_key.create"}))
        assert [e["target"] for e in events.structured_content["data"]] == [key["id"]]


async def test_changes_are_audited_as_tool_calls_with_secrets_redacted(
        mcp_url: str, app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    sa, agent = await create_sa(client, admin, sorted(scope_rules.AGENT_DEFAULT_SCOPES))
    async with mcp_session(mcp_url, agent, "legacy") as session:
        created = await session.call_tool("keyplane_create_virtual_key", {
            "name": "audited", "metadata": {"note": "leaked mcp_sk_" + "Z" * 40}})
        key_id = created.structured_content["key"]["id"]
        secret = created.structured_content["secret"]
        await session.call_tool("keyplane_rotate_virtual_key", {"key_id": key_id, "grace_seconds": 60})
        await session.call_tool("keyplane_revoke_virtual_key", {"key_id": key_id})
        for _ in range(3):  # read-only calls are audited too (queued, appended moments later)
            await session.call_tool("keyplane_list_virtual_keys", {})
    await app.kp.tool_calls.flush()
    events = (await client.get("/api/v1/audit", params={"principal": sa["id"]}, headers=admin)).json()["data"]
    reads = [e for e in events if e["action"] == "keyplane_list_virtual_keys"]
    assert len(reads) == 3 and all(e["details"]["outcome"] == "ok" for e in reads)
    events = [e for e in events if e not in reads]
    assert [e["action"] for e in events] == [
        "keyplane_revoke_virtual_key", "keyplane_rotate_virtual_key", "keyplane_create_virtual_key"]
    created_event = events[-1]
    assert created_event["details"]["change"] == "virtual_key.create"
    assert created_event["details"]["arguments"]["name"] == "audited"
    assert "Z" * 40 not in str(events) and secret not in str(events)
    assert events[0]["details"]["arguments"] == {"key_id": key_id, "mode": "disable", "force": False}
    assert (await client.get("/api/v1/audit/verify", headers=admin)).json()["ok"] is True
    metrics = (await client.get("/metrics")).text
    assert 'keyplane_mcp_tool_calls_total{outcome="ok",tool="keyplane_list_virtual_keys"} 3.0' in metrics


async def test_stateless_mode_serves_every_request_on_its_own(settings_factory: Any) -> None:
    """What `serve --workers N` runs: no sessions, so any process can answer any request."""
    scopes = ["virtual_keys:read", "virtual_keys:create"]
    async with app_with(settings_factory, scopes, mcp_stateless=True) as (base, token):
        for mode in ("legacy", "2026-07-28"):
            async with mcp_session(base + "/mcp", token, mode) as session:
                names = {t.name for t in (await session.list_tools()).tools}
                assert names == {"keyplane_list_virtual_keys", "keyplane_create_virtual_key"}
                made = await session.call_tool("keyplane_create_virtual_key", {"name": f"stateless-{mode}"})
                assert not made.is_error
        async with httpx.AsyncClient(headers={**bearer(token), **ACCEPT}) as http:
            resp = await http.post(base + "/mcp", json=initialize("2025-11-25"))
            assert resp.status_code == 200 and "mcp-session-id" not in resp.headers
