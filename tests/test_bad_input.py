"""Bad input gets a 4xx in the one error shape, never a 500, and nothing is half-written."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import assert_error, create_key

LONG = "x" * 101


async def _state(client: httpx.AsyncClient, admin: dict[str, str]) -> tuple[int, int]:
    keys = (await client.get("/api/v1/keys", params={"limit": 200}, headers=admin)).json()["data"]
    audit = (await client.get("/api/v1/audit", params={"limit": 1}, headers=admin)).json()["data"]
    return len(keys), audit[0]["seq"]


CREATE_CASES: list[tuple[Any, int, str]] = [
    ({}, 422, "name"),
    ({"name": ""}, 422, "name"),
    ({"name": LONG}, 422, "name"),
    ({"name": 5}, 422, "name"),
    ({"name": "a", "bogus": 1}, 422, "unknown field"),
    ({"name": "a", "scopes": "chats:create"}, 422, "scopes"),
    ({"name": "a", "scopes": ["chats:destroy"]}, 400, "chats:destroy"),
    ({"name": "a", "scopes": ["admin"]}, 400, "admin"),
    ({"name": "a", "ip_allowlist": ["10.0.0.0/33"]}, 400, "10.0.0.0/33"),
    ({"name": "a", "ip_allowlist": ["not-an-ip"]}, 400, "not-an-ip"),
    ({"name": "a", "expires_in": 0}, 422, "expires_in"),
    ({"name": "a", "expires_in": -5}, 422, "expires_in"),
    ({"name": "a", "expires_at": "2001-01-01T00:00:00Z"}, 400, "past"),
    ({"name": "a", "expires_at": "tomorrow"}, 422, "expires_at"),
    ({"name": "a", "expires_in": 60, "expires_at": "2100-01-01T00:00:00Z"}, 400, "not both"),
    ({"name": "a", "limit_profile": "gold"}, 400, "gold"),
    ({"name": "a", "limit_profile": "Bad Name"}, 422, "limit_profile"),
    ({"name": "a", "metadata": {"k": 1}}, 422, "metadata"),
    ({"name": "a", "metadata": {f"k{i}": "v" for i in range(33)}}, 400, "32"),
    ({"name": "a", "metadata": {"k": "v" * 513}}, 400, "512"),
    ({"name": "a", "metadata": {"k" * 65: "v"}}, 400, "64"),
    ({"name": "a", "require_signature": "maybe"}, 422, "require_signature"),
    ([1, 2], 422, ""),
]


@pytest.mark.parametrize(("body", "status", "mention"), CREATE_CASES)
async def test_bad_key_creation_is_refused_cleanly(
    client: httpx.AsyncClient, admin: dict[str, str], body: Any, status: int, mention: str
) -> None:
    before = await _state(client, admin)
    resp = await client.post("/api/v1/keys", json=body, headers=admin)
    err = assert_error(resp, status, "invalid_request")
    assert mention in err["message"]
    assert await _state(client, admin) == before


async def test_malformed_json_and_wrong_content_type(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    before = await _state(client, admin)
    headers = {**admin, "content-type": "application/json"}
    assert_error(await client.post("/api/v1/keys", content=b"{bad", headers=headers), 400, "invalid_request")
    assert_error(await client.post("/api/v1/keys", content=b"", headers=headers), 422, "invalid_request")
    form = await client.post("/api/v1/keys", data={"name": "x"}, headers=admin)
    assert "application/json" in assert_error(form, 415, "invalid_request")["message"]
    no_type = await client.post("/api/v1/keys", content=b'{"name": "plain"}', headers=admin)
    assert no_type.status_code == 201  # a body without Content-Type is read as JSON
    assert (await _state(client, admin))[0] == before[0] + 1


async def test_unknown_ids_and_routes(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for method, path in (("GET", "/api/v1/keys/key_missing"), ("PATCH", "/api/v1/keys/key_missing"),
                         ("POST", "/api/v1/keys/key_missing/disable"), ("POST", "/api/v1/keys/key_missing/rotate"),
                         ("DELETE", "/api/v1/keys/key_missing"), ("POST", "/api/v1/keys/key_missing/subkeys"),
                         ("GET", "/api/v1/limit-profiles/none"), ("GET", "/api/v1/service-accounts/sa_missing"),
                         ("GET", "/api/v1/nothing-here")):
        body = {"name": "n"} if path.endswith("subkeys") else {"name": "n"} if method == "PATCH" else None
        resp = await client.request(method, path, json=body, headers=admin)
        assert_error(resp, 404, "not_found")
    resp = await client.put("/api/v1/keys", headers=admin)
    assert_error(resp, 405, "method_not_allowed")


async def test_bad_query_parameters(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    assert_error(await client.get("/api/v1/keys", params={"status": "weird"}, headers=admin), 422, "invalid_request")
    assert_error(await client.get("/api/v1/keys", params={"limit": 0}, headers=admin), 422, "invalid_request")
    assert_error(await client.get("/api/v1/keys", params={"limit": "lots"}, headers=admin), 422, "invalid_request")
    assert_error(await client.get("/api/v1/keys", params={"cursor": "!!"}, headers=admin), 400, "invalid_request")
    assert_error(await client.get("/api/v1/audit", params={"since": "yesterday"}, headers=admin), 400,
                 "invalid_request")


async def test_bad_updates_rotations_and_profiles(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, _ = await create_key(client, admin)
    before = await _state(client, admin)
    url = f"/api/v1/keys/{key['id']}"
    for body, status in (({"name": None}, 400), ({"name": LONG}, 422), ({"ip_allowlist": ["999.1.1.1"]}, 400),
                         ({"limit_profile": "nope"}, 400), ({"secret": "x"}, 422), ({"scopes": None}, 400)):
        assert_error(await client.patch(url, json=body, headers=admin), status, "invalid_request")
    for grace in (-1, "soon", 10**9):
        resp = await client.post(f"{url}/rotate", json={"grace_seconds": grace}, headers=admin)
        assert_error(resp, 422, "invalid_request")
    for body in ({"name": "Upper"}, {"name": "p", "requests_per_minute": 0}, {"name": "p", "cost_per_day_usd": -1},
                 {"name": "p", "requests_per_minute": "many"}, {"name": "free"}):
        resp = await client.post("/api/v1/limit-profiles", json=body, headers=admin)
        assert resp.status_code in (409, 422), resp.text
    assert await _state(client, admin) == before
    unchanged = (await client.get(url, headers=admin)).json()["key"]
    assert {k: unchanged[k] for k in ("name", "scopes", "limit_profile", "updated_at")} == {
        k: key[k] for k in ("name", "scopes", "limit_profile", "updated_at")
    }


async def test_bad_service_accounts(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for body in ({"name": "x"}, {"name": "x", "scopes": []}, {"name": "x", "scopes": ["root"]},
                 {"name": LONG, "scopes": ["audit:read"]}, {"name": "x", "scopes": ["audit:read"], "token": "t"}):
        resp = await client.post("/api/v1/service-accounts", json=body, headers=admin)
        assert resp.status_code in (400, 422), resp.text
        assert resp.json()["error"]["code"] == "invalid_request"
