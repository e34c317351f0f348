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
        _, sa_token = await create_sa(client, admin, ["virtual_keys:create", "chats:create", "keys:verify"])
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
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records] + [r.getMessage() for r in caplog.records]
    assert any("INSERT INTO virtual_keys" in line for line in lines)  # the capture did see SQL
    for line in lines:
        for secret_value in secrets_seen:
            assert secret_value not in line
    assert not any(TOKEN.search(formatter.format(r)) for r in caplog.records)


def test_formatter_masks_token_shaped_text() -> None:
    token = "mcp_sk_" + "A" * 32
    assert token not in redact(f"oops {token} leaked")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value=%s", (token,), None)
    assert token not in JsonFormatter().format(record)
