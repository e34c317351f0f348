"""Nothing logs a secret: every log record of a busy session, SQL included, is free of tokens."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from keyplane.logs import JsonFormatter, redact
from tests.conftest import bearer, create_key, create_sa, verify

TOKEN = re.compile(r"mcp_s[ak]_[0-9A-Za-z]{32}")


async def test_no_secret_reaches_any_log_line(
    caplog: pytest.LogCaptureFixture, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # even with SQL echo on
    try:
        secrets_seen = [admin_token]
        _, sa_token = await create_sa(client, admin, ["virtual_keys:create", "virtual_keys:read", "chats:create",
                                                      "keys:verify"])
        secrets_seen.append(sa_token)
        key, secret = await create_key(client, bearer(sa_token), scopes=["chats:create"])
        secrets_seen.append(secret)
        rotated = await client.post(f"/api/v1/keys/{key['id']}/rotate", json={"grace_seconds": 5}, headers=admin)
        secrets_seen.append(rotated.json()["secret"])
        await verify(client, bearer(sa_token), secret)
        await verify(client, admin, secret[:-2] + "zz")
        await client.post("/api/v1/keys/verify", content=b'{"key": "' + secret.encode() + b'", "bad": ', headers=admin)
        await client.get("/api/v1/keys", headers=bearer(secret))  # a virtual key on the control plane
        await client.get("/api/v1/keys", headers=bearer(sa_token[:-1] + "x"))
        provider_secret = "sk-provider-secret-never-logged-42"
        secrets_seen.append(provider_secret)
        await client.post("/api/v1/providers", headers=admin, json={
            "name": "unreachable", "base_url": "http://127.0.0.1:9/v1", "api_key": provider_secret,
            "models": [{"name": "m-x"}]})
        await client.patch("/api/v1/providers/unreachable", headers=admin, json={"api_key": provider_secret + "2"})
        await client.post("/v1/chat/completions", json={"model": "m-x"}, headers=bearer(rotated.json()["secret"]))
        # The dashboard: sign in with the token, create a key (its secret is on the page once).
        signed_in = await client.post("/ui/login", data={"token": sa_token})
        assert signed_in.status_code == 303
        page = (await client.get("/ui/keys")).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        made = await client.post("/ui/keys", data={"name": "from-ui", "scopes": "chats:create", "csrf": csrf})
        secrets_seen.append(re.search(r'id="new-secret">(mcp_sk_\w+)<', made.text).group(1))  # type: ignore[union-attr]
        # MCP: a tool call that mints a key, its token also tried on the URL.
        mcp_headers = {**bearer(sa_token), "Accept": "application/json, text/event-stream", "Host": "127.0.0.1"}
        init = await client.post("/mcp", headers=mcp_headers, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
        session = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await client.post("/mcp", headers={**mcp_headers, **session},
                          json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        called = await client.post("/mcp", headers={**mcp_headers, **session}, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "keyplane_create_virtual_key", "arguments": {"name": "from-mcp"}}})
        secrets_seen.append(re.search(r"mcp_sk_[0-9A-Za-z]{32}", called.text).group(0))  # type: ignore[union-attr]
        await client.post(f"/mcp?api_key={sa_token}", headers={"Host": "127.0.0.1"},
                          json={"jsonrpc": "2.0", "id": 3, "method": "ping"})
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    formatter = JsonFormatter()
    # The test's own HTTP client logs the URLs it requests (one carried ?api_key=): not keyplane's logs.
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    lines = [formatter.format(r) for r in records] + [r.getMessage() for r in records]
    assert any("INSERT INTO virtual_keys" in line for line in lines)  # the capture did see SQL
    for line in lines:
        for secret_value in secrets_seen:
            assert secret_value not in line
    assert not any(TOKEN.search(formatter.format(r)) for r in records)


def test_formatter_masks_token_shaped_text() -> None:
    token = "mcp_sk_" + "A" * 32
    assert token not in redact(f"oops {token} leaked")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value=%s", (token,), None)
    assert token not in JsonFormatter().format(record)
