"""Control-plane authentication, the scope table, and no escalation through service accounts or minting."""

from __future__ import annotations

import httpx
import pytest

from keyplane.domain import tokens
from keyplane.domain.scopes import CONTROL_PLANE_ROUTES
from tests.conftest import assert_error, bearer, create_key, create_sa


async def test_missing_malformed_unknown_and_revoked_tokens(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    resp = await client.get("/api/v1/keys")
    err = assert_error(resp, 401, "missing_bearer")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert err["type"] == "authentication_error"
    assert_error(await client.get("/api/v1/keys", headers={"Authorization": "Basic abc"}), 401, "missing_bearer")
    assert_error(await client.get("/api/v1/keys", headers=bearer("mcp_sa_short")), 401, "invalid_api_key")
    unknown = tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)
    resp = await client.get("/api/v1/keys", headers=bearer(unknown))
    assert_error(resp, 401, "invalid_api_key")
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    # A virtual key is not a control-plane credential.
    _, vk = await create_key(client, admin)
    assert_error(await client.get("/api/v1/keys", headers=bearer(vk)), 401, "invalid_api_key")

    sa, token = await create_sa(client, admin, ["virtual_keys:read"])
    assert (await client.get("/api/v1/keys", headers=bearer(token))).status_code == 200
    resp = await client.delete(f"/api/v1/service-accounts/{sa['id']}", headers=admin)
    assert resp.status_code == 200 and resp.json()["service_account"]["status"] == "revoked"
    # Refused on its very next request.
    assert_error(await client.get("/api/v1/keys", headers=bearer(token)), 401, "invalid_api_key")


async def test_missing_scope_is_named(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, token = await create_sa(client, admin, ["virtual_keys:read"])
    resp = await client.post("/api/v1/keys", json={"name": "x"}, headers=bearer(token))
    err = assert_error(resp, 403, "insufficient_scope")
    assert "virtual_keys:create" in err["message"] and err["scope"] == "virtual_keys:create"
    assert err["type"] == "permission_error"
    assert 'scope="virtual_keys:create"' in resp.headers["www-authenticate"]
    for path in ("/api/v1/audit", "/api/v1/service-accounts", "/api/v1/limit-profiles"):
        assert (await client.get(path, headers=bearer(token))).status_code == 403


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [(m, p, s) for (m, p), s in CONTROL_PLANE_ROUTES.items() if s],
)
async def test_every_route_in_the_table_demands_its_scope(
    client: httpx.AsyncClient, admin: dict[str, str], method: str, path: str, scope: str
) -> None:
    others = sorted({s for s in CONTROL_PLANE_ROUTES.values() if s and s != scope})
    _, token = await create_sa(client, admin, others)
    url = path.format(key_id="key_x", sa_id="sa_x", name="free", rule_id="alr_x")
    resp = await client.request(method, url, headers=bearer(token), json={})
    err = assert_error(resp, 403, "insufficient_scope")
    assert err["scope"] == scope


async def test_every_api_route_is_in_the_scope_table(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/api/")}
    assert routes <= set(CONTROL_PLANE_ROUTES)


async def test_service_accounts_cannot_grant_what_they_lack(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, manager = await create_sa(client, admin, ["service_accounts:manage", "virtual_keys:read"])
    ok = await client.post("/api/v1/service-accounts", json={"name": "reader", "scopes": ["virtual_keys:read"]},
                           headers=bearer(manager))
    assert ok.status_code == 201
    for scopes in (["admin"], ["virtual_keys:create"], ["virtual_keys:read", "audit:read"]):
        resp = await client.post("/api/v1/service-accounts", json={"name": "evil", "scopes": scopes},
                                 headers=bearer(manager))
        assert_error(resp, 403, "insufficient_scope")
    # ... and cannot revoke an account more powerful than itself.
    admins = (await client.get("/api/v1/service-accounts", headers=admin)).json()["data"]
    admin_id = next(a["id"] for a in admins if a["name"] == "admin")
    assert_error(await client.delete(f"/api/v1/service-accounts/{admin_id}", headers=bearer(manager)), 403,
                 "insufficient_scope")


async def test_minting_keys_cannot_escalate(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, minter = await create_sa(client, admin, ["virtual_keys:create", "models:read", "chats:create"])
    ok = await client.post("/api/v1/keys", json={"name": "chat", "scopes": ["chats:create"]}, headers=bearer(minter))
    assert ok.status_code == 201
    default = await client.post("/api/v1/keys", json={"name": "d"}, headers=bearer(minter))
    assert default.json()["key"]["scopes"] == ["chats:create", "models:read"]  # defaults narrowed to what it holds
    resp = await client.post("/api/v1/keys", json={"name": "e", "scopes": ["embeddings:create"]},
                             headers=bearer(minter))
    err = assert_error(resp, 403, "insufficient_scope")
    assert "embeddings:create" in err["message"]
    parent_id = ok.json()["key"]["id"]
    sub = await client.post(f"/api/v1/keys/{parent_id}/subkeys", json={"name": "s", "scopes": ["models:read"]},
                            headers=bearer(minter))
    assert_error(sub, 403, "insufficient_scope")  # parent lacks models:read


async def test_service_account_lifecycle(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    sa, token = await create_sa(client, admin, ["audit:read", "virtual_keys:read"], name="ci-bot")
    assert token.startswith("mcp_sa_") and tokens.is_well_formed(token, tokens.SERVICE_ACCOUNT_PREFIX)
    assert sa["masked_token"] == tokens.mask(token) and sa["scopes"] == ["audit:read", "virtual_keys:read"]
    listed = (await client.get("/api/v1/service-accounts", headers=admin)).json()["data"]
    assert {a["name"] for a in listed} == {"admin", "ci-bot"} and token not in str(listed)
    got = await client.get(f"/api/v1/service-accounts/{sa['id']}", headers=admin)
    assert got.json()["service_account"]["status"] == "active"
    who = (await client.get("/api/v1/whoami", headers=bearer(token))).json()
    assert who["id"] == sa["id"] and who["scopes"] == ["audit:read", "virtual_keys:read"]
    await client.delete(f"/api/v1/service-accounts/{sa['id']}", headers=admin)
    listed = (await client.get("/api/v1/service-accounts", headers=admin)).json()["data"]
    assert [a["name"] for a in listed] == ["admin"]
    everything = await client.get("/api/v1/service-accounts", params={"include_revoked": "true"}, headers=admin)
    assert len(everything.json()["data"]) == 2
    assert_error(await client.delete("/api/v1/service-accounts/sa_nope", headers=admin), 404, "not_found")
