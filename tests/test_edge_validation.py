"""Both stores answer the same refusal: input is bounded at the edge, and OpenAPI says what is refused."""

from __future__ import annotations

import re

import httpx

from tests.conftest import assert_error, create_key

INT32_MAX = 2**31 - 1


async def test_a_nul_byte_in_any_url_parameter_is_a_400_on_every_get_route(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    spec = (await client.get("/openapi.json")).json()
    gets = [path for path, ops in spec["paths"].items() if "get" in ops]
    assert len(gets) >= 14
    for path in gets:
        if "{" in path:
            url = re.sub(r"\{[^}]+\}", "x%00y", path)
            assert_error(await client.get(url, headers=admin), 400, "invalid_request")
        params = [p["name"] for p in spec["paths"][path]["get"].get("parameters", []) if p["in"] == "query"]
        for name in params:
            resp = await client.get(f"{re.sub(r'{[^}]+}', 'x', path)}?{name}=a%00b", headers=admin)
            assert_error(resp, 400, "invalid_request")
    assert_error(await client.get("/ui/keys?q=%00", headers=admin), 400, "invalid_request")


async def test_nul_bytes_and_out_of_range_integers_in_bodies_are_refused_alike(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for body in ({"name": "a\x00b"}, {"name": "k", "cost_center": "\x00"}, {"name": "k", "environment": "x\x00"},
                 {"name": "k", "metadata": {"a\x00": "b"}}, {"name": "k", "metadata": {"a": "\x00"}},
                 {"name": "k", "scopes": ["chats:create\x00"]}, {"name": "k", "ip_allowlist": ["10.0.0.0/8\x00"]},
                 {"name": " \x1c "}):
        assert_error(await client.post("/api/v1/keys", json=body, headers=admin), 422, "invalid_request")
    resp = await client.post("/api/v1/service-accounts", json={"name": "a\x00", "scopes": ["usage:read"]},
                             headers=admin)
    assert_error(resp, 422, "invalid_request")
    key, _ = await create_key(client, admin)
    resp = await client.patch(f"/api/v1/keys/{key['id']}", json={"name": "\x00"}, headers=admin)
    assert_error(resp, 422, "invalid_request")

    provider = {"name": "p", "base_url": "http://127.0.0.1:9/v1", "models": [{"name": "m"}]}
    for secret in ("sk-a\nInjected: header", "sk\x00", "", "sk key"):  # it travels in an HTTP header
        resp = await client.post("/api/v1/providers", json={**provider, "api_key": secret}, headers=admin)
        assert_error(resp, 422, "invalid_request")

    too_big = {"name": "huge", "tokens_per_minute": 3_000_000_000}
    assert_error(await client.post("/api/v1/limit-profiles", json=too_big, headers=admin), 422, "invalid_request")
    biggest = await client.post("/api/v1/limit-profiles", json={"name": "huge", "tokens_per_minute": INT32_MAX},
                                headers=admin)
    assert biggest.status_code == 201, biggest.text  # the schema's bound is the column's bound
    assert (await client.get("/api/v1/limit-profiles/huge", headers=admin)).json()["limit_profile"][
        "tokens_per_minute"] == INT32_MAX


async def test_numbers_are_numbers_and_patch_needs_a_field(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    for body in ({"name": "p1", "cost_per_day_usd": False}, {"name": "p1", "requests_per_minute": True},
                 {"name": "p1", "requests_per_minute": "5"}, {"name": "p1", "requests_per_minute": 5.5}):
        assert_error(await client.post("/api/v1/limit-profiles", json=body, headers=admin), 422, "invalid_request")
    ok = await client.post("/api/v1/limit-profiles", json={"name": "p1", "cost_per_day_usd": 3}, headers=admin)
    assert ok.status_code == 201 and ok.json()["limit_profile"]["cost_per_day_usd"] == 3.0
    key, _ = await create_key(client, admin)
    assert_error(await client.patch(f"/api/v1/keys/{key['id']}", json={}, headers=admin), 422, "invalid_request")
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["schemas"]["KeyUpdate"]["minProperties"] == 1


async def test_405_lists_every_allowed_method(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    resp = await client.put("/api/v1/keys/vk_x", headers=admin)
    assert_error(resp, 405, "method_not_allowed")
    assert set(resp.headers["allow"].split(", ")) >= {"GET", "PATCH", "DELETE"}
    resp = await client.put("/api/v1/limit-profiles/x", headers=admin)
    assert set(resp.headers["allow"].split(", ")) >= {"GET", "PATCH", "DELETE"}
    resp = await client.get("/v1/chat/completions")
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["allow"] == "POST"


async def test_openapi_documents_every_refusal_in_the_error_shape(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    error_ref = "#/components/schemas/ErrorBody"
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method, op in ops.items():
            statuses = set(op["responses"])
            assert {"400", "401", "403", "422", "503"} <= statuses, (method, path)
            if "{" in path:
                assert "404" in statuses, (method, path)
            for status, response in op["responses"].items():
                if status.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, status)
