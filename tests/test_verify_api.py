"""POST /api/v1/keys/verify: every code, the cache, and no store lookup for malformed or cached keys."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx

from keyplane.app import KeyplaneApp
from keyplane.domain import tokens
from tests.conftest import assert_error, bearer, count_store_loads, create_key, create_sa, verify


async def test_each_code(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, secret = await create_key(client, admin, scopes=["chats:create"], ip_allowlist=["10.0.0.0/8", "::1/128"],
                                   cost_center="cc", metadata={"team": "a"})
    ok = await verify(client, admin, secret, scopes=["chats:create"], ip="10.2.3.4")
    assert ok["valid"] is True and ok["code"] == "VALID"
    assert ok["key"]["id"] == key["id"] and ok["key"]["scopes"] == ["chats:create"]
    assert ok["key"]["metadata"] == {"team": "a"} and secret not in str(ok)
    assert (await verify(client, admin, secret, ip="::1"))["code"] == "VALID"
    assert (await verify(client, admin, secret, ip="::ffff:10.0.0.1"))["code"] == "VALID"

    bad_ip = await verify(client, admin, secret, ip="192.168.1.1")
    assert bad_ip == {**bad_ip, "valid": False, "code": "IP_NOT_ALLOWED"}
    assert (await verify(client, admin, secret))["code"] == "IP_NOT_ALLOWED"  # allowlisted key, no IP given
    scope = await verify(client, admin, secret, scopes=["embeddings:create"], ip="10.0.0.1")
    assert scope["code"] == "INSUFFICIENT_SCOPE" and scope["missing_scope"] == "embeddings:create"

    await client.post(f"/api/v1/keys/{key['id']}/disable", headers=admin)
    assert (await verify(client, admin, secret, ip="10.0.0.1"))["code"] == "DISABLED"

    missing = await verify(client, admin, tokens.generate(tokens.VIRTUAL_KEY_PREFIX))
    assert missing == {"valid": False, "code": "NOT_FOUND", "key": None}
    assert (await verify(client, admin, "mcp_sk_garbage"))["code"] == "NOT_FOUND"
    assert (await verify(client, admin, "", scopes=[]))["code"] == "NOT_FOUND"


async def test_expired(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, secret = await create_key(client, admin, expires_in=2)
    assert (await verify(client, admin, secret))["code"] == "VALID"
    expires_at = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
    # Sleep until just past the stored expiry, whatever the machine's load made of the first call.
    await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.05)
    assert (await verify(client, admin, secret))["code"] == "EXPIRED"


async def test_needs_keys_verify_scope_and_bearer(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin)
    assert_error(await client.post("/api/v1/keys/verify", json={"key": secret}), 401, "missing_bearer")
    # A virtual key cannot verify itself: this is a service-account API.
    resp = await client.post("/api/v1/keys/verify", json={"key": secret}, headers=bearer(secret))
    assert_error(resp, 401, "invalid_api_key")
    _, reader = await create_sa(client, admin, ["virtual_keys:read"])
    resp = await client.post("/api/v1/keys/verify", json={"key": secret}, headers=bearer(reader))
    assert assert_error(resp, 403, "insufficient_scope")["scope"] == "keys:verify"
    _, verifier = await create_sa(client, admin, ["keys:verify"])
    assert (await verify(client, bearer(verifier), secret))["valid"]


async def test_bad_bodies(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    url = "/api/v1/keys/verify"
    assert_error(await client.post(url, content=b"{nope", headers=admin), 400, "invalid_request")
    assert_error(await client.post(url, json={"scopes": []}, headers=admin), 422, "invalid_request")
    assert_error(await client.post(url, json={"key": 5}, headers=admin), 422, "invalid_request")
    assert_error(await client.post(url, json={"key": "k", "extra": 1}, headers=admin), 422, "invalid_request")
    assert_error(await client.post(url, json={"key": "k", "scopes": "x"}, headers=admin), 422, "invalid_request")
    big = b'{"key": "' + b"a" * 2_000_000 + b'"}'
    assert_error(await client.post(url, content=big, headers=admin), 413, "payload_too_large")
    assert_error(await client.get(url, headers=admin), 405, "method_not_allowed")


async def test_hits_come_from_the_cache_and_malformed_keys_never_reach_the_store(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    _, secret = await create_key(client, admin)
    loads = count_store_loads(app)
    for _ in range(20):
        assert (await verify(client, admin, secret))["valid"]
    assert len(loads) == 1  # one miss, then the cache

    for bad in ("mcp_sk_x", secret[:-1] + ("A" if secret[-1] != "A" else "B"), "sk-openai-style", secret + "0"):
        assert (await verify(client, admin, bad))["code"] == "NOT_FOUND"
    assert len(loads) == 1  # refused on shape and checksum alone

    unknown = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
    for _ in range(10):
        assert (await verify(client, admin, unknown))["code"] == "NOT_FOUND"
    assert len(loads) == 2  # the negative cache answers repeats


async def test_concurrent_misses_load_once(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    _, secret = await create_key(client, admin)
    app.kp.key_cache.clear()
    loads = count_store_loads(app, delay=0.05)
    results = await asyncio.gather(*(verify(client, admin, secret) for _ in range(30)))
    assert all(r["valid"] for r in results) and len(loads) == 1


async def test_last_used_is_written_off_the_request_path(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, secret = await create_key(client, admin)
    for _ in range(3):
        await verify(client, admin, secret)
    for _ in range(50):  # the background flusher runs every 0.2 s in tests
        got = (await client.get(f"/api/v1/keys/{key['id']}", headers=admin)).json()["key"]
        if got["request_count"] == 3:
            break
        await asyncio.sleep(0.05)
    assert got["request_count"] == 3 and got["last_used_at"] is not None


async def test_another_process_change_drops_only_what_it_touched(
    settings_factory: Any, app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    """Two servers on one store: a disable on one reaches the other through the audit feed, and
    only the disabled key leaves the other's cache."""
    k1, s1 = await create_key(client, admin, name="one")
    _, s2 = await create_key(client, admin, name="two")
    other = KeyplaneApp(settings_factory(change_poll_seconds=3600))  # polled by hand below
    await other.startup()
    try:
        transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as second:
            for secret in (s1, s2):
                assert (await verify(second, admin, secret))["valid"]
            # A creation drops nothing: no process can hold a stale copy of a key that did not exist,
            # and dropping copies would cost stale-if-error its answer during a store outage.
            _, s3 = await create_key(client, admin, name="three")
            assert (await verify(second, admin, s3))["valid"]  # cached before the poll sees its creation
            loads = count_store_loads(other)
            await other.kp.poll_changes()
            for secret in (s1, s2, s3):
                assert (await verify(second, admin, secret))["valid"]
            assert loads == []
            await client.post(f"/api/v1/keys/{k1['id']}/disable", headers=admin)
            loads = count_store_loads(other)
            await other.kp.poll_changes()
            assert (await verify(second, admin, s1))["code"] == "DISABLED"
            assert (await verify(second, admin, s2))["valid"]
            assert len(loads) == 1  # only the disabled key was dropped and reloaded
    finally:
        await other.shutdown()
