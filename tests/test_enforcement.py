"""Every data-plane request applies the key's whole policy, in order, each refusal with its own error."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keyplane.app import KeyplaneApp
from keyplane.domain import signing, tokens
from tests.conftest import assert_error, count_store_loads, create_key

MODELS = "/v1/models"


@pytest.fixture
async def make_client(settings_factory: Any) -> AsyncIterator[Any]:
    """Apps with custom settings, sharing this test's store; each client may pose as its own address."""
    apps: list[KeyplaneApp] = []
    clients: list[httpx.AsyncClient] = []

    async def make(ip: str = "127.0.0.1", **overrides: Any) -> tuple[KeyplaneApp, httpx.AsyncClient]:
        app = KeyplaneApp(settings_factory(**overrides))
        await app.startup()
        apps.append(app)
        transport = httpx.ASGITransport(app=app, client=(ip, 50000))
        client = httpx.AsyncClient(transport=transport, base_url="http://keyplane.test")
        clients.append(client)
        return app, client

    yield make
    for c in clients:
        await c.aclose()
    for a in apps:
        await a.shutdown()


def key_headers(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_accepted_request_and_both_credential_headers(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin, scopes=["models:read"])
    resp = await client.get(MODELS, headers=key_headers(secret))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"object": "list", "data": []}  # no provider configured yet
    assert resp.headers["ratelimit-limit"] == "60" and resp.headers["ratelimit-remaining"] == "59"
    assert int(resp.headers["ratelimit-reset"]) >= 1
    resp = await client.get(MODELS, headers={"x-api-key": secret})
    assert resp.status_code == 200 and resp.headers["ratelimit-remaining"] == "58"


async def test_refusals_in_order(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    resp = await client.get(MODELS)
    assert_error(resp, 401, "missing_bearer")
    assert resp.headers["www-authenticate"] == 'Bearer realm="keyplane"'
    assert_error(await client.get(MODELS, headers=key_headers("mcp_sk_short")), 401, "invalid_api_key")
    good = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
    assert_error(await client.get(MODELS, headers=key_headers(good[:-1] + "Q")), 401, "invalid_api_key")
    resp = await client.get(MODELS, headers=key_headers(good))
    assert_error(resp, 401, "invalid_api_key")
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]

    key, secret = await create_key(client, admin, scopes=["chats:create"], ip_allowlist=["10.0.0.0/8"],
                                   expires_in=1)
    # Disabled beats everything after it.
    await client.post(f"/api/v1/keys/{key['id']}/disable", headers=admin)
    assert_error(await client.get(MODELS, headers=key_headers(secret)), 401, "key_disabled")
    await client.post(f"/api/v1/keys/{key['id']}/enable", headers=admin)
    # The test client is 127.0.0.1: outside the allowlist.
    err = assert_error(await client.get(MODELS, headers=key_headers(secret)), 403, "ip_not_allowed")
    assert err["type"] == "permission_error"
    await client.patch(f"/api/v1/keys/{key['id']}", json={"ip_allowlist": ["127.0.0.0/8"]}, headers=admin)
    resp = await client.get(MODELS, headers=key_headers(secret))
    err = assert_error(resp, 403, "insufficient_scope")
    assert "models:read" in err["message"] and err["scope"] == "models:read"
    await asyncio.sleep(1.05)
    assert_error(await client.get(MODELS, headers=key_headers(secret)), 401, "key_expired")

    parent, _ = await create_key(client, admin, scopes=["models:read"])
    sub = await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "s"}, headers=admin)
    sub_secret = sub.json()["secret"]
    assert (await client.get(MODELS, headers=key_headers(sub_secret))).status_code == 200
    await client.post(f"/api/v1/keys/{parent['id']}/disable", headers=admin)
    assert_error(await client.get(MODELS, headers=key_headers(sub_secret)), 401, "key_disabled")

    deleted, deleted_secret = await create_key(client, admin)
    await client.delete(f"/api/v1/keys/{deleted['id']}", headers=admin)
    assert_error(await client.get(MODELS, headers=key_headers(deleted_secret)), 401, "invalid_api_key")

    rotated, old = await create_key(client, admin)
    assert (await client.get(MODELS, headers=key_headers(old))).status_code == 200
    await client.post(f"/api/v1/keys/{rotated['id']}/rotate", json={"grace_seconds": 0}, headers=admin)
    assert_error(await client.get(MODELS, headers=key_headers(old)), 401, "invalid_api_key")


async def test_unknown_routes_methods_and_large_bodies(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin)
    assert_error(await client.get("/v1/nothing", headers=key_headers(secret)), 404, "not_found")
    assert_error(await client.post(MODELS, headers=key_headers(secret)), 405, "method_not_allowed")
    resp = await client.post("/v1/chat/completions", content=b"x" * 1_100_000, headers=key_headers(secret))
    assert_error(resp, 413, "payload_too_large")


async def test_trusted_proxy_handling(make_client: Any) -> None:
    app, direct = await make_client(ip="192.0.2.10", trusted_proxies="10.9.0.0/16")
    assert app.bootstrap is not None and app.bootstrap.admin_token
    admin = key_headers(app.bootstrap.admin_token)
    _, secret = await create_key(direct, admin, scopes=["models:read"], ip_allowlist=["198.51.100.0/24"])
    spoof = {**key_headers(secret), "X-Forwarded-For": "198.51.100.7"}
    # Not from a trusted proxy: the header is ignored and the peer is outside the allowlist.
    assert_error(await direct.get(MODELS, headers=spoof), 403, "ip_not_allowed")
    _, via_proxy = await make_client(ip="10.9.1.1", trusted_proxies="10.9.0.0/16")
    assert (await via_proxy.get(MODELS, headers=spoof)).status_code == 200
    chained = {**key_headers(secret), "X-Forwarded-For": "198.51.100.7, 203.0.113.5, 10.9.3.3"}
    assert_error(await via_proxy.get(MODELS, headers=chained), 403, "ip_not_allowed")  # rightmost untrusted


def signed(secret: str, body: bytes = b"", ts: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    return {**key_headers(secret), "X-MCP-Timestamp": stamp, "X-MCP-Signature": signing.sign(secret, stamp, body)}


async def test_request_signing(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin, require_signature=True)
    err = assert_error(await client.get(MODELS, headers=key_headers(secret)), 401, "invalid_signature")
    assert "X-MCP-Timestamp" in err["message"]
    assert (await client.get(MODELS, headers=signed(secret))).status_code == 200
    headers = signed(secret)
    headers["X-MCP-Signature"] = signing.sign(secret, headers["X-MCP-Timestamp"], b"other body")
    assert_error(await client.get(MODELS, headers=headers), 401, "invalid_signature")
    stale = signed(secret, ts=int(time.time()) - 301)
    assert "clock" in assert_error(await client.get(MODELS, headers=stale), 401, "invalid_signature")["message"]
    future = signed(secret, ts=int(time.time()) + 301)
    assert_error(await client.get(MODELS, headers=future), 401, "invalid_signature")
    wrong_key = signed(tokens.generate(tokens.VIRTUAL_KEY_PREFIX))
    wrong_key["Authorization"] = f"Bearer {secret}"
    assert_error(await client.get(MODELS, headers=wrong_key), 401, "invalid_signature")

    # A signature presented on a key that does not require one is still checked.
    _, plain = await create_key(client, admin)
    bad = {**key_headers(plain), "X-MCP-Timestamp": str(int(time.time())), "X-MCP-Signature": "00" * 32}
    assert_error(await client.get(MODELS, headers=bad), 401, "invalid_signature")
    assert (await client.get(MODELS, headers=signed(plain))).status_code == 200


async def test_replayed_signatures_are_refused_even_concurrently(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    _, secret = await create_key(client, admin, require_signature=True, limit_profile="professional")
    headers = signed(secret)
    # 15 replays: under the failed-authentication brake (20 a minute), which counts bad signatures too.
    results = await asyncio.gather(*(client.get(MODELS, headers=headers) for _ in range(16)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] + [401] * 15
    assert all(r.json()["error"]["code"] == "invalid_signature" for r in results if r.status_code == 401)
    fresh = signed(secret, ts=int(headers["X-MCP-Timestamp"]) + 1)  # a new signature works...
    assert (await client.get(MODELS, headers=fresh)).status_code == 200
    again = await client.get(MODELS, headers=headers)
    assert "already used" in assert_error(again, 401, "invalid_signature")["message"]


async def test_free_key_gets_exactly_ten_at_once(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin, limit_profile="free")
    for i in range(10):
        resp = await client.get(MODELS, headers=key_headers(secret))
        assert resp.status_code == 200, (i, resp.text)
        assert resp.headers["ratelimit-remaining"] == str(9 - i)
    resp = await client.get(MODELS, headers=key_headers(secret))
    err = assert_error(resp, 429, "rate_limited")
    assert err["type"] == "rate_limit_error" and err["limit"] == "requests_per_minute"
    assert int(resp.headers["retry-after"]) >= 1 and resp.headers["ratelimit-remaining"] == "0"
    assert resp.headers["ratelimit-limit"] == "10"


async def test_two_hundred_concurrent_requests_admit_no_more_than_the_limit(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    _, secret = await create_key(client, admin, limit_profile="free")
    app.kp.key_cache.clear()  # start cold: the first requests race on the cache miss too
    results = await asyncio.gather(*(client.get(MODELS, headers=key_headers(secret)) for _ in range(200)))
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 190


async def test_subkey_requests_count_against_the_parent(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    parent, _ = await create_key(client, admin, limit_profile="free")
    a = (await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "a"}, headers=admin)).json()
    b = (await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "b"}, headers=admin)).json()
    for _ in range(6):
        assert (await client.get(MODELS, headers=key_headers(a["secret"]))).status_code == 200
    for _ in range(4):
        assert (await client.get(MODELS, headers=key_headers(b["secret"]))).status_code == 200
    # b has used 4 of its own 10, but the parent's 10 are spent.
    assert_error(await client.get(MODELS, headers=key_headers(b["secret"])), 429, "rate_limited")


async def test_profile_and_scope_changes_apply_on_the_next_request(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, secret = await create_key(client, admin, limit_profile="free", scopes=["models:read", "chats:create"])
    assert (await client.get(MODELS, headers=key_headers(secret))).headers["ratelimit-limit"] == "10"
    await client.patch("/api/v1/limit-profiles/free", json={"requests_per_minute": 25}, headers=admin)
    assert (await client.get(MODELS, headers=key_headers(secret))).headers["ratelimit-limit"] == "25"
    await client.patch(f"/api/v1/keys/{key['id']}", json={"scopes": ["chats:create"]}, headers=admin)
    assert_error(await client.get(MODELS, headers=key_headers(secret)), 403, "insufficient_scope")


async def test_brute_force_brake(make_client: Any) -> None:
    app, attacker = await make_client(ip="203.0.113.66", brake_max_failures=5, brake_block_seconds=30)
    assert app.bootstrap is not None and app.bootstrap.admin_token
    admin = key_headers(app.bootstrap.admin_token)
    _, secret = await create_key(attacker, admin)
    loads = count_store_loads(app)
    for _ in range(5):
        guess = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
        assert_error(await attacker.get(MODELS, headers=key_headers(guess)), 401, "invalid_api_key")
    assert len(loads) == 5
    for _ in range(20):
        guess = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
        resp = await attacker.get(MODELS, headers=key_headers(guess))
        assert_error(resp, 429, "rate_limited")
        assert int(resp.headers["retry-after"]) >= 1
    assert len(loads) == 5  # blocked guesses never reach the store
    # The blocked address is refused even with a good key; another address is not affected.
    assert_error(await attacker.get(MODELS, headers=key_headers(secret)), 429, "rate_limited")
    transport = httpx.ASGITransport(app=app, client=("198.51.100.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
        assert (await other.get(MODELS, headers=key_headers(secret))).status_code == 200


async def test_bad_service_account_tokens_brake_the_address_on_every_surface(make_client: Any) -> None:
    """Guessing service-account tokens (the most powerful credential) counts towards the same brake as
    guessing virtual keys, on the REST API, the verify endpoint, the MCP server and the dashboard's
    sign-in; once braked, the address is refused everywhere, even with a good token."""
    app, attacker = await make_client(ip="203.0.113.77", brake_max_failures=5, brake_block_seconds=30)
    assert app.bootstrap is not None and app.bootstrap.admin_token
    admin = key_headers(app.bootstrap.admin_token)
    _, secret = await create_key(attacker, admin)

    def guess() -> dict[str, str]:
        return key_headers(tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX))

    assert_error(await attacker.get("/api/v1/keys", headers=guess()), 401, "invalid_api_key")
    assert_error(await attacker.get("/api/v1/keys", headers=key_headers("mcp_sa_malformed")), 401,
                 "invalid_api_key")
    assert_error(await attacker.post("/api/v1/keys/verify", json={"key": secret}, headers=guess()), 401,
                 "invalid_api_key")
    mcp = await attacker.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                              headers={**guess(), "Accept": "application/json, text/event-stream"})
    assert_error(mcp, 401, "invalid_api_key")
    # A request without any token is not a guess: it does not count.
    assert_error(await attacker.get("/api/v1/keys"), 401, "missing_bearer")
    login = await attacker.post("/ui/login", data={"token": tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)})
    assert login.status_code == 401  # the fifth guess: braked from here on

    for resp in (
        await attacker.get("/api/v1/keys", headers=admin),
        await attacker.post("/api/v1/keys/verify", json={"key": secret}, headers=admin),
        await attacker.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                            headers={**admin, "Accept": "application/json, text/event-stream"}),
        await attacker.get(MODELS, headers=key_headers(secret)),
    ):
        err = assert_error(resp, 429, "rate_limited")
        assert err["limit"] == "failed_authentications" and int(resp.headers["retry-after"]) >= 1
    login = await attacker.post("/ui/login", data={"token": app.bootstrap.admin_token})
    assert login.status_code == 429 and "Too many failed authentications" in login.text
    assert "set-cookie" not in login.headers
    transport = httpx.ASGITransport(app=app, client=("198.51.100.2", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as other:
        assert (await other.get("/api/v1/keys", headers=admin)).status_code == 200


async def test_metrics_and_one_log_line_per_request(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, secret = await create_key(client, admin)
    written: list[bytes] = []
    app.kp.access_log.sink = written.append
    await client.get(MODELS, headers=key_headers(secret))
    await client.get(MODELS, headers=key_headers(secret))
    await client.get(MODELS, headers=key_headers(tokens.generate(tokens.VIRTUAL_KEY_PREFIX)))
    app.kp.access_log.flush()
    lines = [json.loads(line) for line in b"".join(written).splitlines()]
    assert len(lines) == 3
    assert lines[0]["key_id"] == key["id"] and lines[0]["status"] == 200 and lines[0]["route"] == MODELS
    assert lines[0]["logger"] == "keyplane.access" and lines[0]["time"].endswith("Z")
    assert lines[0]["client_ip"] == "127.0.0.1" and lines[0]["ms"] >= 0
    assert lines[2]["code"] == "invalid_api_key" and lines[2]["key_id"] is None
    assert secret.encode() not in b"".join(written)

    text = (await client.get("/metrics")).text
    assert 'keyplane_requests_total{code="ok",route="/v1/models",status="200"} 2.0' in text
    assert 'keyplane_requests_total{code="invalid_api_key",route="/v1/models",status="401"} 1.0' in text
    assert "keyplane_auth_seconds_bucket" in text
    assert 'keyplane_key_cache_hits_total{cache="virtual_keys"}' in text
    assert 'keyplane_key_cache_misses_total{cache="virtual_keys"}' in text


async def test_access_log_is_bounded_and_says_what_it_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from keyplane.runtime.access_log import AccessLog

    written: list[bytes] = []
    log = AccessLog(sink=written.append, max_pending=3)
    for i in range(5):
        log.record({"n": i})
    log.flush()
    assert [json.loads(x)["n"] for x in b"".join(written).splitlines()] == [0, 1, 2]
    assert "2 lines dropped" in caplog.text


async def test_verify_api_shares_the_rate_limit(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin, limit_profile="free")
    for _ in range(5):
        assert (await client.get(MODELS, headers=key_headers(secret))).status_code == 200
    codes = []
    for _ in range(6):
        resp = await client.post("/api/v1/keys/verify", json={"key": secret}, headers=admin)
        codes.append(resp.json()["code"])
    assert codes == ["VALID"] * 5 + ["RATE_LIMITED"]
    assert resp.json()["retry_after"] >= 1 and resp.headers["ratelimit-remaining"] == "0"


async def test_cached_keys_keep_working_while_the_store_is_unreachable(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    _, secret = await create_key(client, admin, limit_profile="free")
    assert (await client.get(MODELS, headers=key_headers(secret))).status_code == 200
    app.kp.key_cache.positive.ttl = 0.0  # the cached copy is now past its TTL

    async def store_down(digest: str) -> None:
        raise ConnectionRefusedError("store down")

    app.kp._load_key = store_down  # type: ignore[assignment,method-assign]
    assert (await client.get(MODELS, headers=key_headers(secret))).status_code == 200  # stale-if-error
    never_seen = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
    resp = await client.get(MODELS, headers=key_headers(never_seen))
    assert_error(resp, 503, "store_unavailable")
    assert resp.headers["retry-after"] == "1"
    assert "keyplane_stale_credentials_served_total 1.0" in (await client.get("/metrics")).text


def test_the_one_pass_credentials_read_is_bearer_and_the_signature_header() -> None:
    """Admission reads the credential and ``x-mcp-signature`` in one pass (gateway/asgi.py ``credentials``):
    the same answers as ``bearer`` and ``header``, duplicates and odd spacing included."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from keyplane.gateway.asgi import bearer, credentials, header

    names = st.sampled_from([b"authorization", b"x-api-key", b"x-mcp-signature", b"host"])
    values = st.one_of(st.binary(max_size=12), st.sampled_from(
        [b"Bearer mcp_sk_x", b"bearer  tok ", b"Bearer ", b"Bearer \xa0t\xa0", b"Basic abc", b" ", b"Bearer"]))

    def bearer_as_it_was(scope: dict[str, Any]) -> str | None:  # before "Bearer " was taken without lower()
        auth = api_key = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                auth = value
            elif key == b"x-api-key":
                api_key = value
        if auth is not None:
            scheme, _, token = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        if api_key is not None and api_key.strip():
            return api_key.decode("latin-1").strip()
        return None

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.tuples(names, values), max_size=5))
    def same(headers: list[tuple[bytes, bytes]]) -> None:
        scope = {"headers": headers}
        assert credentials(scope) == (bearer(scope), header(scope, b"x-mcp-signature"))
        assert bearer(scope) == bearer_as_it_was(scope)

    same()
    assert credentials({"headers": [(b"authorization", b"Bearer \xa0t\xa0")]})[0] == "t"  # str.strip, as before
