"""Regression tests for the holes an outside attacker found (issue 11, items 1, 2, 3, 8, 9, 10 and 14).

Each test replays the attack and expects the refusal the product promises.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keyplane.app import KeyplaneApp
from keyplane.domain import signing, tokens
from keyplane.domain.scopes import MCP_READ_ONLY_TOOLS
from tests.conftest import assert_error, bearer, create_key, create_sa, verify
from tests.processes import serve
from tests.test_mcp import ACCEPT, initialize, mcp_session, tool_call

MODELS = "/v1/models"


def signed(secret: str, body: bytes = b"") -> dict[str, str]:
    stamp = str(int(time.time()))
    return {**bearer(secret), "X-MCP-Timestamp": stamp, "X-MCP-Signature": signing.sign(secret, stamp, body)}


@contextlib.asynccontextmanager
async def started(settings_factory: Any, **overrides: Any) -> AsyncIterator[tuple[KeyplaneApp, httpx.AsyncClient]]:
    application = KeyplaneApp(settings_factory(**overrides))
    await application.startup()
    try:
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
            yield application, c
    finally:
        await application.shutdown()


# -- 1. signed-request replay ---------------------------------------------------------------------------

async def test_a_replayed_signature_is_refused_in_any_case_or_padding(client: httpx.AsyncClient,
                                                                      admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin, require_signature=True, limit_profile="professional")
    headers = signed(secret)
    assert (await client.get(MODELS, headers=headers)).status_code == 200
    sig = headers["X-MCP-Signature"]
    variants = [sig.upper(), sig[:10].upper() + sig[10:], f"  {sig}", f"{sig.upper()} ", sig.swapcase()]
    for variant in variants:
        resp = await client.get(MODELS, headers={**headers, "X-MCP-Signature": variant})
        assert "already used" in assert_error(resp, 401, "invalid_signature")["message"], variant


# -- 8. odd signature headers ----------------------------------------------------------------------------

async def test_odd_signature_header_bytes_are_invalid_signatures_and_count_towards_the_brake(
        settings_factory: Any) -> None:
    async with started(settings_factory, brake_max_failures=4) as (app, client):
        assert app.bootstrap is not None and app.bootstrap.admin_token
        _, secret = await create_key(client, bearer(app.bootstrap.admin_token), require_signature=True)
        now = str(int(time.time())).encode()
        good_sig = signing.sign(secret, now.decode(), b"").encode()
        odd: list[dict[str, bytes]] = [
            {"x-mcp-timestamp": now[:-1] + "²".encode("latin-1"), "x-mcp-signature": good_sig},  # isdigit, not int
            {"x-mcp-timestamp": now, "x-mcp-signature": "é".encode("latin-1") * 64},  # compare_digest raises
            {"x-mcp-timestamp": "١٢٣".encode(), "x-mcp-signature": good_sig},  # Arabic-Indic digits (UTF-8 bytes)
            {"x-mcp-timestamp": now, "x-mcp-signature": good_sig[:-2] + "ÿ".encode("latin-1") * 2},
        ]
        for extra in odd:
            resp = await client.get(MODELS, headers={"Authorization": f"Bearer {secret}", **extra})
            assert_error(resp, 401, "invalid_signature")
        # Four bad signatures from this address: the brake now refuses it before any check.
        err = assert_error(await client.get(MODELS, headers=signed(secret)), 429, "rate_limited")
        assert err["limit"] == "failed_authentications"


# -- 2. a sub-key inside its parent's IP allowlist ------------------------------------------------------

async def test_a_subkey_is_bound_by_every_ancestors_ip_allowlist(client: httpx.AsyncClient,
                                                                 admin: dict[str, str]) -> None:
    parent, parent_secret = await create_key(client, admin, scopes=["models:read"], ip_allowlist=["10.0.0.0/8"])
    made = await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "child"}, headers=admin)
    assert made.status_code == 201, made.text
    child_secret = made.json()["secret"]
    grandchild = await client.post(f"/api/v1/keys/{made.json()['key']['id']}/subkeys",
                                   json={"name": "grandchild", "ip_allowlist": ["0.0.0.0/0"]}, headers=admin)
    grandchild_secret = grandchild.json()["secret"]
    for secret in (parent_secret, child_secret, grandchild_secret):  # this client is 127.0.0.1
        assert_error(await client.get(MODELS, headers=bearer(secret)), 403, "ip_not_allowed")
        assert (await verify(client, admin, secret, ip="127.0.0.1"))["code"] == "IP_NOT_ALLOWED"
        assert (await verify(client, admin, secret))["code"] == "IP_NOT_ALLOWED"  # no address: not admitted
        assert (await verify(client, admin, secret, ip="10.1.2.3"))["code"] == "VALID"
    # The ancestor's list is read at request time: widening it reaches the sub-keys at once.
    resp = await client.patch(f"/api/v1/keys/{parent['id']}", json={"ip_allowlist": ["127.0.0.0/8"]}, headers=admin)
    assert resp.status_code == 200
    assert (await client.get(MODELS, headers=bearer(child_secret))).status_code == 200
    # ... and the grandchild's own list still applies with it (both must admit the client).
    resp = await client.patch(f"/api/v1/keys/{grandchild.json()['key']['id']}",
                              json={"ip_allowlist": ["192.0.2.0/24"]}, headers=admin)
    assert_error(await client.get(MODELS, headers=bearer(grandchild_secret)), 403, "ip_not_allowed")
    assert (await verify(client, admin, grandchild_secret, ip="192.0.2.1"))["code"] == "IP_NOT_ALLOWED"


# -- 3. no secret the caller could not have minted ------------------------------------------------------

REVOKER = ["virtual_keys:read", "virtual_keys:revoke"]


async def test_rotation_never_hands_out_a_secret_the_caller_could_not_mint(
        app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    chat, chat_secret = await create_key(client, admin, name="admin-chat", scopes=["chats:create", "models:read"])
    _, revoker = await create_sa(client, admin, REVOKER, name="revoker")
    _, narrow = await create_sa(client, admin, ["virtual_keys:read", "virtual_keys:revoke", "virtual_keys:create",
                                                "models:read"], name="narrow")
    _, peer = await create_sa(client, admin, ["virtual_keys:revoke", "virtual_keys:create", "chats:create",
                                              "models:read"], name="peer")

    # REST: without virtual_keys:create, then without chats:create, the rotation is refused and changes nothing.
    url = f"/api/v1/keys/{chat['id']}/rotate"
    assert_error(await client.post(url, json={}, headers=bearer(revoker)), 403, "insufficient_scope")
    err = assert_error(await client.post(url, json={}, headers=bearer(narrow)), 403, "insufficient_scope")
    assert err["scope"] == "chats:create"
    assert (await verify(client, admin, chat_secret))["valid"]

    # MCP tool: the guard lets the call through (it needs virtual_keys:revoke), the service refuses it.
    async with serve(app) as base:
        async with mcp_session(base + "/mcp", revoker, "legacy") as session:
            refused = await session.call_tool("keyplane_rotate_virtual_key", {"key_id": chat["id"]})
            assert refused.is_error and "insufficient_scope" in refused.content[0].text
            assert "mcp_sk_" not in str(refused.content)
    assert (await verify(client, admin, chat_secret))["valid"]

    # Dashboard: signed in as the revoker, the rotate button's POST is refused too.
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as ui:
        assert (await ui.post("/ui/login", data={"token": revoker})).status_code == 303
        page = await ui.get("/ui/keys")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        resp = await ui.post(f"/ui/keys/{chat['id']}/rotate", data={"csrf": csrf.group(1)})
        assert resp.status_code == 403, resp.status_code
        assert re.search(r"mcp_sk_[0-9A-Za-z]{32}", resp.text) is None
    assert (await verify(client, admin, chat_secret))["valid"]

    # A caller who could have minted the key may rotate it.
    rotated = await client.post(url, json={}, headers=bearer(peer))
    assert rotated.status_code == 200, rotated.text
    assert (await verify(client, admin, rotated.json()["secret"]))["valid"]
    assert not (await verify(client, admin, chat_secret))["valid"]


# -- 9. the MCP guard reads what the SDK reads ----------------------------------------------------------

async def test_a_body_only_the_sdk_could_parse_no_longer_skips_the_scope_check(
        app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, secret = await create_key(client, admin)
    _, reader = await create_sa(client, admin, ["virtual_keys:read"], name="reader")
    async with serve(app) as base, httpx.AsyncClient(headers={**bearer(reader), **ACCEPT}) as http:
        resp = await http.post(base + "/mcp", json=initialize("2025-11-25"))
        session = {"mcp-session-id": resp.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post(base + "/mcp", headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        for number in (b"NaN", b"Infinity", b"-Infinity"):
            body = (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"keyplane_rotate_virtual_key",'
                    b'"arguments":{"key_id":"' + key["id"].encode() + b'","grace_seconds":' + number + b'}}}')
            resp = await http.post(base + "/mcp", headers=session, content=body)
            assert_error(resp, 403, "insufficient_scope")
        plain = await http.post(base + "/mcp", headers=session, json=tool_call("keyplane_list_virtual_keys", {}))
        assert plain.status_code == 200
    assert (await verify(client, admin, secret))["valid"]


# -- 10. every MCP tools/call in the audit log -----------------------------------------------------------

async def test_every_tool_call_reaches_the_audit_log_once(app: KeyplaneApp, client: httpx.AsyncClient,
                                                          admin: dict[str, str], admin_token: str) -> None:
    sa, token = await create_sa(client, admin, ["virtual_keys:read", "virtual_keys:create", "models:read"],
                                name="agent")
    async with serve(app) as base, mcp_session(base + "/mcp", admin_token, "legacy") as session:
        # The cache invalidator skips exactly the read-only tools' entries: the table matches the annotations.
        tools = (await session.list_tools()).tools
        assert {t.name for t in tools if t.annotations and t.annotations.read_only_hint} == MCP_READ_ONLY_TOOLS
    async with serve(app) as base, mcp_session(base + "/mcp", token, "legacy") as session:
        listed = await session.call_tool("keyplane_list_virtual_keys", {})
        assert not listed.is_error
        created = await session.call_tool("keyplane_create_virtual_key", {"name": "agent-made"})
        assert not created.is_error
        key_id = created.structured_content["key"]["id"]
        # Refused by the service (no such key) and by the guard (no virtual_keys:revoke).
        missing = await session.call_tool("keyplane_list_virtual_keys", {"cursor": "not-a-cursor"})
        assert missing.is_error
        with pytest.raises(Exception):  # noqa: B017 - the SDK client raises on the guard's HTTP 403
            await session.call_tool("keyplane_revoke_virtual_key", {"key_id": key_id})
    await app.kp.tool_calls.flush()
    events = (await client.get("/api/v1/audit", params={"principal": sa["id"], "limit": 50},
                               headers=admin)).json()["data"]
    # Reads and refusals are appended moments after the call (off its path): compare without order.
    calls = sorted((e["action"], e["details"].get("outcome", "")) for e in events)
    assert calls == [
        ("keyplane_create_virtual_key", ""),  # recorded by the change itself, once
        ("keyplane_list_virtual_keys", "ok"),
        ("keyplane_list_virtual_keys", "refused"),
        ("keyplane_revoke_virtual_key", "refused"),
    ], calls
    assert all("called_at" in e["details"] for e in events if "outcome" in e["details"])
    refused = {e["action"]: e for e in events if e["details"].get("outcome") == "refused"}
    assert "invalid_request" in refused["keyplane_list_virtual_keys"]["details"]["reason"]
    by_guard = refused["keyplane_revoke_virtual_key"]
    assert by_guard["details"]["reason"].startswith("insufficient_scope") and by_guard["target"] == key_id
    assert (await client.get("/api/v1/audit/verify", headers=admin)).json()["ok"] is True


# -- 14. secrets pasted into free text -------------------------------------------------------------------

async def test_secrets_pasted_into_free_text_are_refused_everywhere(
        app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str) -> None:
    leaked_key = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
    leaked_sa = tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)
    key, _ = await create_key(client, admin, name="plain")
    attempts = [
        ("POST", "/api/v1/keys", {"name": f"prod {leaked_key}"}),
        ("POST", "/api/v1/keys", {"name": "x", "metadata": {"note": f"token={leaked_sa}"}}),
        ("POST", "/api/v1/keys", {"name": "x", "metadata": {leaked_key: "v"}}),
        ("POST", "/api/v1/keys", {"name": "x", "cost_center": leaked_key}),
        ("POST", "/api/v1/keys", {"name": "x", "environment": f"{leaked_sa}!"}),
        ("POST", "/api/v1/keys", {"name": "x", "scopes": [leaked_key]}),
        ("POST", "/api/v1/keys", {"name": "x", "allowed_models": [leaked_key]}),
        ("POST", f"/api/v1/keys/{key['id']}/subkeys", {"name": leaked_key}),
        ("PATCH", f"/api/v1/keys/{key['id']}", {"name": leaked_sa}),
        ("PATCH", f"/api/v1/keys/{key['id']}", {"metadata": {"a": leaked_key}}),
        ("POST", "/api/v1/service-accounts", {"name": "x", "scopes": ["usage:read"], "description": leaked_sa}),
        ("POST", "/api/v1/limit-profiles", {"name": "lp", "description": leaked_key, "requests_per_minute": 5}),
    ]
    for method, url, body in attempts:
        resp = await client.request(method, url, json=body, headers=admin)
        err = assert_error(resp, 422, "invalid_request")
        assert "keyplane secret was detected" in err["message"], (url, body)
        assert leaked_key not in resp.text and leaked_sa not in resp.text
    # Exact by checksum: a display mask or a mistyped key is ordinary text.
    mistyped = leaked_key[:-1] + ("A" if leaked_key[-1] != "A" else "B")
    for text in (tokens.mask(leaked_key), mistyped):
        ok = await client.post("/api/v1/keys", json={"name": "ok", "metadata": {"ref": text}}, headers=admin)
        assert ok.status_code == 201, ok.text

    async with serve(app) as base, mcp_session(base + "/mcp", admin_token, "legacy") as session:
        refused = await session.call_tool("keyplane_create_virtual_key", {"name": f"for {leaked_key}"})
        assert refused.is_error and "keyplane secret was detected" in refused.content[0].text
        # A secret sent where an id belongs is not stored verbatim in the audit trail either.
        await session.call_tool("keyplane_rotate_virtual_key", {"key_id": leaked_key})
    await app.kp.tool_calls.flush()

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as ui:
        assert (await ui.post("/ui/login", data={"token": admin_token})).status_code == 303
        page = await ui.get("/ui/keys")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        resp = await ui.post("/ui/keys", data={"csrf": csrf.group(1), "name": "ui", "cost_center": leaked_key})
        assert resp.status_code == 400 and "keyplane secret was detected" in resp.text  # the form, re-shown

    trail = (await client.get("/api/v1/audit", params={"limit": 200}, headers=admin)).text
    assert leaked_key not in trail and leaked_sa not in trail
    assert tokens.mask(leaked_key) in trail  # the refused rotate names what was sent, masked
    keys = (await client.get("/api/v1/keys", params={"limit": 200}, headers=admin)).text
    assert leaked_key not in keys and leaked_sa not in keys
