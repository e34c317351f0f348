"""Limit profiles: the three built-ins, CRUD, and refusing to delete one in use."""

from __future__ import annotations

import httpx

from tests.conftest import assert_error, create_key


async def test_builtins_exist_from_the_start(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    data = (await client.get("/api/v1/limit-profiles", headers=admin)).json()["data"]
    assert {p["name"]: p["requests_per_minute"] for p in data} == {"free": 10, "standard": 60, "professional": 300}


async def test_crud_and_in_use(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    body = {"name": "batch", "requests_per_minute": 5, "tokens_per_minute": 10000, "cost_per_day_usd": 2.5,
            "budget_per_month_usd": 40}
    resp = await client.post("/api/v1/limit-profiles", json=body, headers=admin)
    assert resp.status_code == 201
    assert {k: resp.json()["limit_profile"][k] for k in body} == body
    assert_error(await client.post("/api/v1/limit-profiles", json=body, headers=admin), 409, "conflict")

    resp = await client.patch("/api/v1/limit-profiles/batch", json={"requests_per_minute": 7}, headers=admin)
    assert resp.json()["limit_profile"]["requests_per_minute"] == 7
    assert resp.json()["limit_profile"]["tokens_per_minute"] == 10000
    got = await client.get("/api/v1/limit-profiles/batch", headers=admin)
    assert got.json()["limit_profile"]["requests_per_minute"] == 7

    key, _ = await create_key(client, admin, limit_profile="batch")
    err = assert_error(await client.delete("/api/v1/limit-profiles/batch", headers=admin), 409, "conflict")
    assert "1 key" in err["message"]
    await client.delete(f"/api/v1/keys/{key['id']}", headers=admin)
    assert (await client.delete("/api/v1/limit-profiles/batch", headers=admin)).status_code == 200
    assert_error(await client.get("/api/v1/limit-profiles/batch", headers=admin), 404, "not_found")

    actions = [e["action"] for e in (await client.get("/api/v1/audit", headers=admin)).json()["data"]]
    assert {"limit_profile.create", "limit_profile.update", "limit_profile.delete"} <= set(actions)


async def test_profile_change_reaches_cached_keys(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, secret = await create_key(client, admin, limit_profile="free")
    from tests.conftest import verify

    assert (await verify(client, admin, secret))["key"]["limit_profile"] == "free"
    await client.patch(f"/api/v1/keys/{(await verify(client, admin, secret))['key']['id']}",
                       json={"limit_profile": "professional"}, headers=admin)
    assert (await verify(client, admin, secret))["key"]["limit_profile"] == "professional"
