"""Two organizations: neither sees nor changes the other's keys, accounts, profiles or audit trail."""

from __future__ import annotations

import httpx

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key, create_sa, verify


async def test_two_orgs_are_isolated(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    acme = await app.kp.organizations.create("acme")
    other = bearer(acme.admin_token)
    mine, my_secret = await create_key(client, admin, name="mine")
    theirs, their_secret = await create_key(client, other, name="theirs")
    await create_sa(client, other, ["audit:read"], name="their-bot")
    await client.post("/api/v1/limit-profiles", json={"name": "acme-only", "requests_per_minute": 1}, headers=other)

    assert [k["name"] for k in (await client.get("/api/v1/keys", headers=admin)).json()["data"]] == ["mine"]
    assert [k["name"] for k in (await client.get("/api/v1/keys", headers=other)).json()["data"]] == ["theirs"]
    for method, suffix in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/disable"), ("POST", "/enable"),
                           ("POST", "/rotate"), ("POST", "/subkeys")):
        body = {"name": "x"} if method == "PATCH" or suffix == "/subkeys" else None
        resp = await client.request(method, f"/api/v1/keys/{mine['id']}{suffix}", json=body, headers=other)
        assert_error(resp, 404, "not_found")
    assert (await verify(client, admin, my_secret))["valid"]  # untouched

    # Verify answers only for the caller's own organization.
    assert (await verify(client, other, my_secret))["code"] == "NOT_FOUND"
    assert (await verify(client, admin, their_secret))["code"] == "NOT_FOUND"
    assert (await verify(client, other, their_secret))["valid"]

    my_accounts = {a["name"] for a in (await client.get("/api/v1/service-accounts", headers=admin)).json()["data"]}
    assert my_accounts == {"admin"}
    their_sa = next(a for a in (await client.get("/api/v1/service-accounts", headers=other)).json()["data"]
                if a["name"] == "their-bot")
    assert_error(await client.delete(f"/api/v1/service-accounts/{their_sa['id']}", headers=admin), 404, "not_found")

    assert_error(await client.get("/api/v1/limit-profiles/acme-only", headers=admin), 404, "not_found")
    resp = await client.post("/api/v1/keys", json={"name": "x", "limit_profile": "acme-only"}, headers=admin)
    assert_error(resp, 400, "invalid_request")

    my_targets = {e["target"] for e in (await client.get("/api/v1/audit", headers=admin)).json()["data"]}
    assert theirs["id"] not in my_targets and mine["id"] in my_targets
    for headers in (admin, other):
        assert (await client.get("/api/v1/audit/verify", headers=headers)).json()["ok"]
    assert (await client.get("/api/v1/audit/verify", headers=other)).json()["entries"] == 5
