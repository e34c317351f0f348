"""MCP servers as a resource (issue 14): registration, sealed upstream headers, the default key, and a key's
MCP permissions (patterns, sub-key narrowing)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keyplane.app import KeyplaneApp
from keyplane.domain import mcp_access
from keyplane.store.models import McpServer
from tests.conftest import assert_error, bearer, create_key, create_sa

UPSTREAM_SECRET = "Bearer upstream-s3cret-value-0123456789"


async def register(client: httpx.AsyncClient, admin: dict[str, str], **fields: Any) -> dict[str, Any]:
    fields.setdefault("name", "files")
    fields.setdefault("url", "http://127.0.0.1:9/mcp")
    resp = await client.post("/api/v1/mcp-servers", json=fields, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_register_list_get_update_disable_delete(app: KeyplaneApp, client: httpx.AsyncClient,
                                                       admin: dict[str, str]) -> None:
    body = await register(client, admin, headers={"Authorization": UPSTREAM_SECRET, "X-Team": "t-12345678"},
                          tool_scopes={"write_file": "files:write", "read_file": "files:read"}, description="d")
    assert UPSTREAM_SECRET not in str(body) and "t-12345678" not in str(body)
    server = body["mcp_server"]
    assert server["headers"] == ["Authorization", "X-Team"] and server["path"] == "/mcp/files"
    assert body["secret"].startswith("mcp_sk_")
    assert body["key"]["mcp_servers"] == {"files": ["*"]}
    assert set(body["key"]["scopes"]) == {"tools:call", "contexts:read", "prompts:read", "files:write", "files:read"}

    # Sealed at rest: the value is nowhere in the row.
    async with app.kp.db.read() as s:
        row = (await s.execute(select(McpServer))).scalar_one()
    assert row.headers_sealed and UPSTREAM_SECRET not in row.headers_sealed and "upstream-s3cret" not in str(
        row.__dict__)

    assert_error(await client.post("/api/v1/mcp-servers", json={"name": "files", "url": "http://x/mcp"},
                                   headers=admin), 409, "conflict")
    listed = (await client.get("/api/v1/mcp-servers", headers=admin)).json()["data"]
    assert [m["name"] for m in listed] == ["files"]
    resp = await client.patch("/api/v1/mcp-servers/files", json={"headers": {"Authorization": "Bearer other-99999"},
                                                                 "timeout_seconds": 5}, headers=admin)
    assert resp.status_code == 200 and resp.json()["mcp_server"]["headers"] == ["Authorization"]
    assert "other-99999" not in resp.text
    resp = await client.post("/api/v1/mcp-servers/files/disable", headers=admin)
    assert resp.json()["mcp_server"]["status"] == "disabled"
    assert (await client.delete("/api/v1/mcp-servers/files", headers=admin)).json()["deleted"] is True
    assert_error(await client.get("/api/v1/mcp-servers/files", headers=admin), 404, "not_found")

    audit = (await client.get("/api/v1/audit", params={"limit": 50}, headers=admin)).json()["data"]
    actions = [e["action"] for e in audit]
    for action in ("mcp_server.create", "virtual_key.create", "mcp_server.update", "mcp_server.disable",
                   "mcp_server.delete"):
        assert action in actions
    assert "s3cret" not in str(audit) and "other-99999" not in str(audit)


async def test_scope_and_validation(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    _, token = await create_sa(client, admin, ["virtual_keys:create", "tools:call"])
    assert_error(await client.post("/api/v1/mcp-servers", json={"name": "x", "url": "http://x/mcp"},
                                   headers=bearer(token)), 403, "insufficient_scope")
    _, manager = await create_sa(client, admin, ["mcp_servers:manage"], name="mcp-admin")
    # Registering works without minting; the default key needs virtual_keys:create (never granted implicitly).
    resp = await client.post("/api/v1/mcp-servers", json={"name": "x", "url": "http://x/mcp", "default_key": False},
                             headers=bearer(manager))
    assert resp.status_code == 201 and resp.json()["secret"] is None
    assert_error(await client.post("/api/v1/mcp-servers", json={"name": "y", "url": "http://x/mcp"},
                                   headers=bearer(manager)), 403, "insufficient_scope")
    assert (await client.get("/api/v1/mcp-servers/y", headers=admin)).status_code == 404  # nothing half-made
    assert_error(await client.post("/api/v1/mcp-servers", json={"name": "z", "url": "http://x/mcp",
                                                                "tool_scopes": {"t": "nope:x"}}, headers=admin),
                 400, "invalid_request")


async def test_key_mcp_servers_and_subkey_narrowing(client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    parent, _ = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["read_*", "stat"]})
    assert parent["mcp_servers"] == {"files": ["read_*", "stat"]}
    plain, _ = await create_key(client, admin)
    assert plain["mcp_servers"] is None  # absent: no MCP server

    async def sub(grant: Any) -> httpx.Response:
        fields = {"name": "s"} if grant is ... else {"name": "s", "mcp_servers": grant}
        return await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json=fields, headers=admin)

    inherited = await sub(...)
    assert inherited.status_code == 201 and inherited.json()["key"]["mcp_servers"] == {"files": ["read_*", "stat"]}
    for ok in ({"files": ["read_file"]}, {"files": ["read_dir*", "stat"]}, {}):
        assert (await sub(ok)).status_code == 201, ok
    for wider in ({"files": ["*"]}, {"files": ["re*"]}, {"files": ["write_file"]}, {"db": ["*"]},
                  {"files": ["*_file"]}, {"files": ["stat*"]}):
        assert_error(await sub(wider), 400, "invalid_request")
    # Narrowing an existing key only.
    resp = await client.patch(f"/api/v1/keys/{parent['id']}", json={"mcp_servers": {"files": ["read_*"]}},
                              headers=admin)
    assert resp.status_code == 200 and resp.json()["key"]["mcp_servers"] == {"files": ["read_*"]}
    assert_error(await client.patch(f"/api/v1/keys/{parent['id']}", json={"mcp_servers": {"files": ["*"]}},
                                    headers=admin), 400, "invalid_request")
    assert_error(await client.post("/api/v1/keys", json={"name": "bad", "mcp_servers": {"Bad Name": ["*"]}},
                                   headers=admin), 400, "invalid_request")


async def test_granting_mcp_servers_needs_mcp_servers_manage(client: httpx.AsyncClient,
                                                               admin: dict[str, str]) -> None:
    """A principal never grants or obtains MCP access it does not hold: create, sub-key and rotate alike."""
    body = await register(client, admin)
    default_key = body["key"]
    scopes = ["virtual_keys:create", "virtual_keys:revoke", "virtual_keys:read", "tools:call", "contexts:read",
              "prompts:read"]
    _, minter = await create_sa(client, admin, scopes)
    as_minter = bearer(minter)

    # Create: naming a server needs mcp_servers:manage; a key without MCP servers still mints fine.
    err = assert_error(await client.post("/api/v1/keys", json={"name": "k", "scopes": ["tools:call"],
                                                               "mcp_servers": {"files": ["*"]}},
                                         headers=as_minter), 403, "insufficient_scope")
    assert err["scope"] == "mcp_servers:manage"
    plain, _ = await create_key(client, as_minter, scopes=["tools:call"])
    assert plain["mcp_servers"] is None
    assert (await client.post("/api/v1/keys", json={"name": "empty", "scopes": ["tools:call"], "mcp_servers": {}},
                              headers=as_minter)).status_code == 201

    # Sub-key: an explicit grant is refused; the inherited default drops what the caller cannot grant.
    sub_url = f"/api/v1/keys/{default_key['id']}/subkeys"
    assert_error(await client.post(sub_url, json={"name": "s", "scopes": ["tools:call"],
                                                  "mcp_servers": {"files": ["read_*"]}}, headers=as_minter),
                 403, "insufficient_scope")
    resp = await client.post(sub_url, json={"name": "s", "scopes": ["tools:call"]}, headers=as_minter)
    assert resp.status_code == 201 and resp.json()["key"]["mcp_servers"] is None

    # Rotate: a new secret for a key that reaches a server is a grant too.
    assert_error(await client.post(f"/api/v1/keys/{default_key['id']}/rotate", json={}, headers=as_minter),
                 403, "insufficient_scope")
    assert (await client.post(f"/api/v1/keys/{plain['id']}/rotate", json={}, headers=as_minter)).status_code == 200

    # Holding mcp_servers:manage makes all three paths work.
    _, manager = await create_sa(client, admin, [*scopes, "mcp_servers:manage"], name="mcp-minter")
    as_manager = bearer(manager)
    minted, _ = await create_key(client, as_manager, scopes=["tools:call"], mcp_servers={"files": ["read_*"]})
    assert minted["mcp_servers"] == {"files": ["read_*"]}
    resp = await client.post(sub_url, json={"name": "s2", "scopes": ["tools:call"]}, headers=as_manager)
    assert resp.status_code == 201 and resp.json()["key"]["mcp_servers"] == {"files": ["*"]}
    assert (await client.post(f"/api/v1/keys/{default_key['id']}/rotate", json={},
                              headers=as_manager)).status_code == 200


@pytest.mark.parametrize(("pattern", "tool", "expected"), [
    ("*", "anything", True), ("read_*", "read_file", True), ("read_*", "write_file", False),
    ("*_file", "read_file", True), ("a*b*c", "aXbYc", True), ("a*b*c", "acb", False), ("ab*ba", "aba", False),
    ("exact", "exact", True), ("exact", "exactly", False),
])
def test_pattern_matching(pattern: str, tool: str, expected: bool) -> None:
    assert mcp_access.matches(pattern, tool) is expected


def test_pattern_subsets_are_sound() -> None:
    """Brute force: whenever pattern_within says yes, every sample the child matches the parent matches too."""
    patterns = ["*", "a*", "ab*", "*b", "a*b", "ab", "a", "b*", "*a*", "abc", "a*c", "ab*c"]
    samples = ["", "a", "b", "ab", "ba", "abc", "abb", "aab", "ac", "abcb", "bab", "aXb", "abXc", "c"]
    for child in patterns:
        for parent in patterns:
            if mcp_access.pattern_within(child, parent):
                for s in samples:
                    if mcp_access.matches(child, s):
                        assert mcp_access.matches(parent, s), (child, parent, s)
