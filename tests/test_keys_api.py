"""Virtual keys over REST: mint, list, edit, disable, enable, rotate, delete, sub-keys."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from keyplane.app import KeyplaneApp
from keyplane.gateway import verify as verify_module
from tests.conftest import assert_error, create_key, verify


async def test_create_returns_the_secret_once_and_stores_only_its_hash(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, secret = await create_key(
        client, admin, name="billing-app", scopes=["chats:create"], expires_in=3600,
        ip_allowlist=["10.0.0.0/8", "2001:db8::/32"], limit_profile="free", cost_center="cc-42",
        environment="prod", metadata={"team": "billing"}, allowed_models=["gpt-4o-mini"], require_signature=True,
    )
    assert secret.startswith("mcp_sk_") and len(secret) == 39
    assert key["masked_key"] == f"mcp_sk_{secret[7:11]}…{secret[-4:]}"
    assert key["scopes"] == ["chats:create"] and key["limit_profile"] == "free"
    assert key["ip_allowlist"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert key["metadata"] == {"team": "billing"} and key["require_signature"] is True
    assert key["status"] == "enabled" and key["parent_id"] is None and key["last_used_at"] is None
    expires = datetime.fromisoformat(key["expires_at"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)

    got = await client.get(f"/api/v1/keys/{key['id']}", headers=admin)
    assert got.status_code == 200 and secret not in got.text
    listed = await client.get("/api/v1/keys", headers=admin)
    assert secret not in listed.text
    audit = await client.get("/api/v1/audit", headers=admin)
    assert secret not in audit.text

    # The store holds the hash, never the secret.
    from sqlalchemy import text

    async with app.kp.db.read() as s:
        rows = (await s.execute(text("SELECT key_hash, key_mask FROM virtual_keys"))).all()
    import hashlib

    assert rows == [(hashlib.sha256(secret.encode()).hexdigest(), key["masked_key"])]


async def test_defaults_are_the_llm_scopes_and_the_default_profile(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, _ = await create_key(client, admin, name="defaults")
    # Model traffic of every API (docs/gateway.md, "Scopes of new keys"); stored keys are never widened.
    assert key["scopes"] == ["chats:create", "completions:create", "embeddings:create", "messages:create",
                             "models:read", "responses:create"]
    assert key["limit_profile"] == "standard" and key["expires_at"] is None


async def test_list_filters_and_paginates(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for i in range(7):
        await create_key(client, admin, name=f"svc-{i}", cost_center="a" if i % 2 else "b",
                         environment="prod" if i < 3 else "dev")
    k, _ = await create_key(client, admin, name="special one")
    await client.post(f"/api/v1/keys/{k['id']}/disable", headers=admin)

    async def names(**params: object) -> list[str]:
        resp = await client.get("/api/v1/keys", params=params, headers=admin)
        assert resp.status_code == 200, resp.text
        return [item["name"] for item in resp.json()["data"]]

    assert await names(status="disabled") == ["special one"]
    assert len(await names(status="enabled")) == 7
    assert await names(cost_center="a") == ["svc-5", "svc-3", "svc-1"]
    assert await names(environment="prod") == ["svc-2", "svc-1", "svc-0"]
    assert await names(q="SPECIAL") == ["special one"]
    assert await names(q="%") == []  # wildcards are literal

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/v1/keys", params=params, headers=admin)).json()
        seen += [item["name"] for item in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ["special one"] + [f"svc-{i}" for i in range(6, -1, -1)]
    item = page["data"][0]
    for field in ("id", "name", "masked_key", "status", "scopes", "created_at", "last_used_at", "expires_at",
                  "cost_center", "environment", "metadata", "limit_profile", "parent_id"):
        assert field in item


async def test_patch_edits_and_only_narrows_scopes(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, secret = await create_key(client, admin, scopes=["chats:create", "models:read"])
    resp = await client.patch(
        f"/api/v1/keys/{key['id']}",
        json={"name": "renamed", "metadata": {"owner": "ana"}, "cost_center": "cc-1", "environment": "staging",
              "limit_profile": "professional", "scopes": ["models:read"]},
        headers=admin,
    )
    assert resp.status_code == 200, resp.text
    updated = resp.json()["key"]
    assert updated["name"] == "renamed" and updated["metadata"] == {"owner": "ana"}
    assert updated["limit_profile"] == "professional" and updated["scopes"] == ["models:read"]
    # The narrowed scope applies on the next request.
    result = await verify(client, admin, secret, scopes=["chats:create"])
    assert result["code"] == "INSUFFICIENT_SCOPE" and result["missing_scope"] == "chats:create"

    widen = await client.patch(f"/api/v1/keys/{key['id']}", json={"scopes": ["models:read", "chats:create"]},
                               headers=admin)
    assert_error(widen, 400, "invalid_request")
    assert "narrowed" in widen.json()["error"]["message"]
    empty = await client.patch(f"/api/v1/keys/{key['id']}", json={}, headers=admin)
    assert_error(empty, 422, "invalid_request")  # the schema says so too: minProperties 1


async def test_disable_and_enable_take_effect_immediately(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, secret = await create_key(client, admin)
    assert (await verify(client, admin, secret))["code"] == "VALID"
    resp = await client.post(f"/api/v1/keys/{key['id']}/disable", headers=admin)
    assert resp.status_code == 200 and resp.json()["key"]["status"] == "disabled"
    assert (await verify(client, admin, secret))["code"] == "DISABLED"
    resp = await client.post(f"/api/v1/keys/{key['id']}/enable", headers=admin)
    assert resp.json()["key"]["status"] == "enabled"
    assert (await verify(client, admin, secret))["code"] == "VALID"


async def test_rotate_with_grace_keeps_the_old_secret_working_then_stops(
    client: httpx.AsyncClient, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, old = await create_key(client, admin)
    assert (await verify(client, admin, old))["valid"]
    resp = await client.post(f"/api/v1/keys/{key['id']}/rotate", json={"grace_seconds": 60}, headers=admin)
    assert resp.status_code == 200, resp.text
    new = resp.json()["secret"]
    assert new != old and resp.json()["key"]["masked_key"] != key["masked_key"]
    assert (await verify(client, admin, new))["valid"]
    assert (await verify(client, admin, old))["valid"]  # within the grace period
    # Past the grace period, on the verify path's clock (not a real wait: a loaded machine may be slow by
    # seconds, and a short real grace would then end before the first check).
    monkeypatch.setattr(verify_module, "time", _Clock(time.time() + 61))
    assert (await verify(client, admin, old))["code"] == "NOT_FOUND"
    assert (await verify(client, admin, new))["valid"]


class _Clock:
    """Stands in for the ``time`` module where only ``time.time()`` is read."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


async def test_rotate_without_grace_cuts_the_old_secret_at_once(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    key, old = await create_key(client, admin)
    assert (await verify(client, admin, old))["valid"]  # now cached
    resp = await client.post(f"/api/v1/keys/{key['id']}/rotate", headers=admin)
    assert resp.status_code == 200
    assert (await verify(client, admin, old))["code"] == "NOT_FOUND"
    assert (await verify(client, admin, resp.json()["secret"]))["valid"]


async def test_delete_refuses_a_recently_used_key_unless_forced(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    unused, _ = await create_key(client, admin, name="never used")
    resp = await client.delete(f"/api/v1/keys/{unused['id']}", headers=admin)
    assert resp.status_code == 200 and resp.json()["deleted"] is True

    key, secret = await create_key(client, admin, name="busy")
    assert (await verify(client, admin, secret))["valid"]
    err = assert_error(await client.delete(f"/api/v1/keys/{key['id']}", headers=admin), 409, "key_recently_used")
    assert "force" in err["message"]
    # Still there and still working: nothing half-done.
    assert (await verify(client, admin, secret))["valid"]
    await app.kp.flush()  # last_used_at reaches the store off the request path
    got = (await client.get(f"/api/v1/keys/{key['id']}", headers=admin)).json()["key"]
    assert got["last_used_at"] is not None and got["request_count"] == 2
    resp = await client.delete(f"/api/v1/keys/{key['id']}", params={"force": "true"}, headers=admin)
    assert resp.status_code == 200
    assert (await verify(client, admin, secret))["code"] == "NOT_FOUND"
    assert_error(await client.get(f"/api/v1/keys/{key['id']}", headers=admin), 404, "not_found")
    assert_error(await client.post(f"/api/v1/keys/{key['id']}/enable", headers=admin), 404, "not_found")


async def test_a_flush_returns_only_once_the_flush_it_raced_with_has_written(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic flush of last-used times may be writing when a caller (shutdown, a test) flushes: the
    caller's flush must not return before the counts the other one took are in the store (it did: a request
    count read right after a flush was short by the requests of the flush still in flight)."""
    key, secret = await create_key(client, admin, name="busy")
    kp = app.kp
    real = kp.keys.record_last_used
    first_started, release = asyncio.Event(), asyncio.Event()

    async def first_one_slow(batch: dict[str, tuple[datetime, int]]) -> None:
        if not first_started.is_set():
            first_started.set()
            await release.wait()
        await real(batch)

    monkeypatch.setattr(kp.keys, "record_last_used", first_one_slow)
    assert (await verify(client, admin, secret))["valid"]
    periodic = asyncio.create_task(kp.flush())
    await first_started.wait()
    assert (await verify(client, admin, secret))["valid"]
    asyncio.get_running_loop().call_later(1.0, release.set)
    await kp.flush()
    assert periodic.done()  # it had to finish first
    got = (await client.get(f"/api/v1/keys/{key['id']}", headers=admin)).json()["key"]
    assert got["request_count"] == 2


async def test_subkeys_are_bounded_by_their_parent(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    parent, parent_secret = await create_key(
        client, admin, name="parent", scopes=["chats:create", "models:read"], expires_in=3600, limit_profile="standard"
    )
    url = f"/api/v1/keys/{parent['id']}/subkeys"
    resp = await client.post(url, json={"name": "child", "scopes": ["models:read"]}, headers=admin)
    assert resp.status_code == 201, resp.text
    child, child_secret = resp.json()["key"], resp.json()["secret"]
    assert child["parent_id"] == parent["id"]
    assert child["expires_at"] == parent["expires_at"]  # inherits the parent's expiry
    assert child["limit_profile"] == "standard"

    wider = await client.post(url, json={"name": "x", "scopes": ["embeddings:create"]}, headers=admin)
    assert_error(wider, 403, "insufficient_scope")
    longer = await client.post(url, json={"name": "x", "expires_in": 7200}, headers=admin)
    assert_error(longer, 400, "invalid_request")
    looser = await client.post(url, json={"name": "x", "limit_profile": "professional"}, headers=admin)
    assert_error(looser, 400, "invalid_request")
    tighter = await client.post(url, json={"name": "x", "limit_profile": "free"}, headers=admin)
    assert tighter.status_code == 201

    listed = (await client.get("/api/v1/keys", params={"parent_id": parent["id"]}, headers=admin)).json()["data"]
    assert {k["name"] for k in listed} == {"child", "x"}

    assert (await verify(client, admin, child_secret))["valid"]
    await client.post(f"/api/v1/keys/{parent['id']}/disable", headers=admin)
    assert (await verify(client, admin, child_secret))["code"] == "DISABLED"  # cut off at once
    await client.post(f"/api/v1/keys/{parent['id']}/enable", headers=admin)
    assert (await verify(client, admin, child_secret))["valid"]

    resp = await client.delete(f"/api/v1/keys/{parent['id']}", params={"force": "true"}, headers=admin)
    assert resp.status_code == 200 and child["id"] in resp.json()["subkeys_deleted"]
    assert (await verify(client, admin, child_secret))["code"] == "NOT_FOUND"
    assert (await verify(client, admin, parent_secret))["code"] == "NOT_FOUND"
    assert_error(await client.get(f"/api/v1/keys/{child['id']}", headers=admin), 404, "not_found")


async def test_narrowing_a_parent_narrows_its_subkeys(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    parent, _ = await create_key(client, admin, scopes=["chats:create", "models:read"])
    resp = await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "c"}, headers=admin)
    child_secret = resp.json()["secret"]
    assert (await verify(client, admin, child_secret, scopes=["chats:create"]))["valid"]
    await client.patch(f"/api/v1/keys/{parent['id']}", json={"scopes": ["models:read"]}, headers=admin)
    result = await verify(client, admin, child_secret, scopes=["chats:create"])
    assert result["code"] == "INSUFFICIENT_SCOPE"
