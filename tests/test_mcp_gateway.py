"""The MCP gateway (issue 14): keyplane keys in front of real MCP servers over real HTTP.

Upstreams: an MCP server built with the official Python SDK (tests/mcp_upstream.py), shared by the module.
Clients: the official Python SDK client, and raw HTTP where the wire itself is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import httpx2
import orjson
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from sqlalchemy import func, select

from keyplane.app import KeyplaneApp
from keyplane.store.models import UsageEvent
from tests import mcp_upstream
from tests.conftest import assert_error, bearer, create_key
from tests.processes import serve

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
ALL_TOOLS = {"read_file", "read_dir", "write_file", "echo", "count", "confirm_delete", "slow", "seen_headers",
             "leaky_headers", "gated"}
CLIENT_INFO = {"name": "raw-test", "version": "1"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[mcp_upstream.Upstream]:
    with mcp_upstream.running() as state:
        yield state


@pytest.fixture(scope="module")
def json_upstream() -> Iterator[mcp_upstream.Upstream]:
    with mcp_upstream.running(json_response=True) as state:
        yield state


@pytest.fixture
async def base(app: KeyplaneApp) -> AsyncIterator[str]:
    async with serve(app) as url:
        yield url


async def register(client: httpx.AsyncClient, admin: dict[str, str], url: str, name: str = "files",
                   **fields: Any) -> tuple[dict[str, Any], str]:
    fields.setdefault("headers", {"Authorization": f"Bearer {mcp_upstream.UPSTREAM_TOKEN}"})
    fields.setdefault("tool_scopes", {"write_file": "files:write", "read_file": "files:read"})
    resp = await client.post("/api/v1/mcp-servers", json={"name": name, "url": url, **fields}, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["mcp_server"], resp.json()["secret"]


@contextlib.asynccontextmanager
async def session(url: str, token: str, mode: str = "legacy", **options: Any) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode, cache=None,
                          **options) as client:
            yield client


async def test_default_key_reaches_every_tool_resource_and_prompt(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream) -> None:
    _, secret = await register(client, admin, upstream.url)
    async with session(f"{base}/mcp/files", secret) as mcp:
        tools = {t.name for t in (await mcp.list_tools()).tools}
        assert tools == ALL_TOOLS
        result = await mcp.call_tool("read_file", {"path": "/etc/motd"})
        assert result.content[0].text == "contents of /etc/motd"
        assert [r.uri for r in (await mcp.list_resources()).resources] == ["file:///readme"]
        assert (await mcp.read_resource("file:///readme")).contents[0].text == "the readme"
        assert [p.name for p in (await mcp.list_prompts()).prompts] == ["review"]
        prompt = await mcp.get_prompt("review", {"code": "x = 1"})
        assert "Please review: x = 1" in prompt.messages[0].content.text


def rpc(method: str, params: dict[str, Any] | None = None, id_: int | None = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if id_ is not None:
        message["id"] = id_
    return message


class Raw:
    """A raw Streamable HTTP client over real HTTP: the wire itself is under test."""

    def __init__(self, http: httpx.AsyncClient, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.session_id: str | None = None

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {**ACCEPT, **bearer(self.token), **extra}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = "2025-06-18"
        return headers

    async def initialize(self) -> httpx.Response:
        resp = await self.post(rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                  "clientInfo": CLIENT_INFO}))
        assert resp.status_code == 200, resp.text
        self.session_id = resp.headers["mcp-session-id"]
        assert (await self.post(rpc("notifications/initialized", id_=None))).status_code == 202
        return resp

    async def post(self, message: Any, **headers: str) -> httpx.Response:
        return await self.http.post(self.url, content=orjson.dumps(message), headers=self.headers(**headers))

    async def result(self, message: dict[str, Any]) -> dict[str, Any]:
        resp = await self.post(message)
        assert resp.status_code == 200, resp.text
        return reply_of(resp)["result"]


def reply_of(resp: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response in a JSON or SSE answer."""
    if resp.headers["content-type"].startswith("text/event-stream"):
        for line in resp.text.splitlines():
            if line.startswith("data:"):
                message = orjson.loads(line[5:].strip())
                if "id" in message and "method" not in message:
                    return message
        raise AssertionError(f"no response in {resp.text!r}")
    return resp.json()


def assert_scope_refusal(resp: httpx.Response, scope: str, code: str = "insufficient_scope") -> dict[str, Any]:
    err = assert_error(resp, 403, code)
    challenge = resp.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and f'scope="{scope}"' in challenge, challenge
    return err


@pytest.fixture
async def raw_http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as http:
        yield http


async def test_every_row_of_the_method_scope_table(base: str, client: httpx.AsyncClient, admin: dict[str, str],
                                                   upstream: mcp_upstream.Upstream, raw_http: httpx.AsyncClient
                                                   ) -> None:
    await register(client, admin, upstream.url)
    # Only tools:call and every tool: server access, plain tools; no resources, prompts or scoped tools.
    _, token = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["*"]})
    raw = Raw(raw_http, f"{base}/mcp/files", token)
    await raw.initialize()  # initialize and notifications: server access only
    assert await raw.result(rpc("ping")) == {}
    assert (await raw.result(rpc("tools/call", {"name": "echo", "arguments": {"text": "hi"}})))["content"][0][
        "text"] == "hi"
    refused = {
        ("tools/call", "files:write"): {"name": "write_file", "arguments": {"path": "p", "text": "t"}},
        ("tools/call", "files:read"): {"name": "read_file", "arguments": {"path": "p"}},
        ("resources/list", "contexts:read"): {},
        ("resources/read", "contexts:read"): {"uri": "file:///readme"},
        ("resources/templates/list", "contexts:read"): {},
        ("resources/subscribe", "contexts:read"): {"uri": "file:///readme"},
        ("resources/unsubscribe", "contexts:read"): {"uri": "file:///readme"},
        ("prompts/list", "prompts:read"): {},
        ("prompts/get", "prompts:read"): {"name": "review", "arguments": {"code": "x"}},
        ("completion/complete", "prompts:read"): {"ref": {"type": "ref/prompt", "name": "review"},
                                                  "argument": {"name": "code", "value": "x"}},
        ("completion/complete", "contexts:read"): {"ref": {"type": "ref/resource", "uri": "file:///docs/{name}"},
                                                   "argument": {"name": "name", "value": "x"}},
    }
    for (method, scope), params in refused.items():
        err = assert_scope_refusal(await raw.post(rpc(method, params)), scope)
        assert err["scope"] == scope and err["server"] == "files", err
    err = assert_error(await raw.post(rpc("sampling/createMessage")), 403, "method_not_allowed")
    assert "sampling/createMessage" in err["message"]
    assert_error(await raw.post([rpc("ping")]), 400, "invalid_request")  # batches are refused

    # The same key with the scopes: every row passes.
    _, full = await create_key(client, admin, scopes=["tools:call", "files:read", "files:write", "contexts:read",
                                                      "prompts:read"], mcp_servers={"files": ["*"]})
    raw = Raw(raw_http, f"{base}/mcp/files", full)
    await raw.initialize()
    for (method, _scope), params in refused.items():
        resp = await raw.post(rpc(method, params))
        assert resp.status_code == 200, (method, resp.text)


async def test_lists_are_filtered_and_patterns_decide_tools(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        json_upstream: mcp_upstream.Upstream) -> None:
    await register(client, admin, upstream.url)
    await register(client, admin, json_upstream.url, name="files-json")
    grant = ["read_*", "echo", "write_file"]
    _, token = await create_key(client, admin, scopes=["tools:call", "files:read"],
                                mcp_servers={"files": grant, "files-json": grant})
    for name in ("files", "files-json"):  # SSE answers and JSON answers alike
        async with session(f"{base}/mcp/{name}", token) as mcp:
            # write_file matches a pattern but needs files:write, which the key lacks: not shown.
            assert {t.name for t in (await mcp.list_tools()).tools} == {"read_file", "read_dir", "echo"}
            assert (await mcp.call_tool("read_dir", {"path": "/x"})).is_error is False
            with pytest.raises(MCPError):  # the gateway's 403 reaches the SDK as an error
                await mcp.call_tool("count", {"steps": 1})
    raw = Raw(httpx.AsyncClient(timeout=30), f"{base}/mcp/files", token)
    async with raw.http:
        await raw.initialize()
        err = assert_scope_refusal(await raw.post(rpc("tools/call", {"name": "count", "arguments": {"steps": 1}})),
                                   "tools:call", code="tool_not_allowed")
        assert err["tool"] == "count"


async def test_subkeys_narrow_and_a_narrowed_parent_narrows_them(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        raw_http: httpx.AsyncClient) -> None:
    await register(client, admin, upstream.url)
    parent, _ = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["*"]})
    resp = await client.post(f"/api/v1/keys/{parent['id']}/subkeys",
                             json={"name": "sub", "mcp_servers": {"files": ["read_*", "echo"]}}, headers=admin)
    assert resp.status_code == 201, resp.text
    raw = Raw(raw_http, f"{base}/mcp/files", resp.json()["secret"])
    await raw.initialize()
    names = {t["name"] for t in (await raw.result(rpc("tools/list")))["tools"]}
    assert names == {"read_dir", "echo"}  # read_file needs files:read
    assert_scope_refusal(await raw.post(rpc("tools/call", {"name": "slow", "arguments": {"seconds": 0}})),
                         "tools:call", code="tool_not_allowed")
    # The parent narrowed to echo only: the sub-key loses read_dir at once.
    resp = await client.patch(f"/api/v1/keys/{parent['id']}", json={"mcp_servers": {"files": ["echo"]}},
                              headers=admin)
    assert resp.status_code == 200, resp.text
    assert {t["name"] for t in (await raw.result(rpc("tools/list", id_=5)))["tools"]} == {"echo"}
    assert_scope_refusal(await raw.post(rpc("tools/call", {"name": "read_dir", "arguments": {"path": "/"}})),
                         "tools:call", code="tool_not_allowed")


async def test_keys_for_one_server_sessions_and_keys_without_mcp_servers(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        raw_http: httpx.AsyncClient) -> None:
    _, key_a = await register(client, admin, upstream.url, name="alpha")
    _, key_b = await register(client, admin, upstream.url, name="beta")
    err = assert_error(await Raw(raw_http, f"{base}/mcp/beta", key_a).post(rpc("ping")), 403, "server_not_allowed")
    assert err["server"] == "beta"
    _, plain = await create_key(client, admin, scopes=["tools:call"])  # no mcp_servers: no MCP server at all
    assert_error(await Raw(raw_http, f"{base}/mcp/alpha", plain).post(rpc("ping")), 403, "server_not_allowed")
    # A key that may use a server that does not exist learns it does not exist; one that may not, does not.
    _, ghost = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"ghost": ["*"]})
    assert_error(await Raw(raw_http, f"{base}/mcp/ghost", ghost).post(rpc("ping")), 404, "not_found")
    assert_error(await Raw(raw_http, f"{base}/mcp/ghost", plain).post(rpc("ping")), 403, "server_not_allowed")

    # A session opened with key A is not usable with key B (same server), nor on another server.
    _, key_a2 = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"alpha": ["*"], "beta": ["*"]})
    raw_a = Raw(raw_http, f"{base}/mcp/alpha", key_a)
    await raw_a.initialize()
    stolen = Raw(raw_http, f"{base}/mcp/alpha", key_a2)
    stolen.session_id = raw_a.session_id
    assert_error(await stolen.post(rpc("tools/list")), 404, "session_not_found")
    other = Raw(raw_http, f"{base}/mcp/beta", key_a2)
    other.session_id = raw_a.session_id
    assert_error(await other.post(rpc("tools/list")), 404, "session_not_found")
    # A forged id with a non-ASCII byte in its MAC is an unknown session too (it was a 500: hmac.compare_digest
    # refuses non-ASCII str; found by tests/test_fuzz_gateway.py).
    forged = await raw_http.post(raw_a.url, content=orjson.dumps(rpc("tools/list")), headers={
        **ACCEPT, **bearer(key_a), "Mcp-Session-Id": (raw_a.session_id or "").encode() + b"\xe9"})
    assert_error(forged, 404, "session_not_found")
    assert (await raw_a.post(rpc("tools/list"))).status_code == 200
    # The routing headers of the 2026 protocol must agree with the body keyplane decided on.
    assert_error(await raw_a.post(rpc("tools/call", {"name": "echo", "arguments": {"text": "x"}}),
                                  **{"Mcp-Method": "tools/call", "Mcp-Name": "write_file"}), 400, "invalid_request")
    assert_error(await raw_a.post(rpc("tools/list"), **{"Mcp-Method": "ping"}), 400, "invalid_request")
    # GET event stream and DELETE of the session go through with the session bound to the key.
    async with raw_http.stream("GET", raw_a.url, headers=raw_a.headers(Accept="text/event-stream")) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert (await raw_http.delete(raw_a.url, headers=raw_a.headers())).status_code in (200, 204)
    assert (await raw_a.post(rpc("tools/list"))).status_code == 404  # the upstream ended it
    key_b_raw = Raw(raw_http, f"{base}/mcp/beta", key_b)
    await key_b_raw.initialize()


async def test_odd_headers_and_plain_text_refusals_come_back_in_the_error_shape(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        raw_http: httpx.AsyncClient) -> None:
    """Both found by tests/test_fuzz_gateway.py: they were a 500 and an upstream's plain-text body."""
    _, secret = await register(client, admin, upstream.url)
    raw = Raw(raw_http, f"{base}/mcp/files", secret)
    await raw.initialize()
    # The upstream SDK refuses a text/plain body in plain text: relayed with its status, in keyplane's shape.
    plain = await raw_http.post(raw.url, content=orjson.dumps(rpc("tools/list")),
                                headers=raw.headers(**{"Content-Type": "text/plain"}))
    err = assert_error(plain, 400, "upstream_refused")
    assert "Content-Type" in err["message"] and "files" in err["message"]
    # A forwarded header with a control character (HTTP forbids them; straight to the ASGI app, no server
    # in between to refuse it first) is refused, not a crash of the upstream client.
    for name in ("Accept", "MCP-Protocol-Version", "Mcp-Param-Path"):
        odd = await client.post("/mcp/files", content=orjson.dumps(rpc("tools/list")),
                                headers={**raw.headers(), name: b"application/json\x00\r\nX-Injected: 1"})
        assert name.lower() in assert_error(odd, 400, "invalid_request")["message"].lower()
    assert (await raw.post(rpc("tools/list"))).status_code == 200


async def test_authentication_and_policy_are_the_v1_enforcement(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        raw_http: httpx.AsyncClient) -> None:
    await register(client, admin, upstream.url)
    url = f"{base}/mcp/files"
    resp = await raw_http.post(url, content=orjson.dumps(rpc("ping")), headers=ACCEPT)
    assert_error(resp, 401, "missing_bearer")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert_error(await Raw(raw_http, url, "mcp_sk_" + "A" * 32).post(rpc("ping")), 401, "invalid_api_key")
    assert_error(await raw_http.post(f"{base}/mcp/No%20Such!", headers=ACCEPT), 404, "not_found")
    assert_error(await raw_http.put(url, headers=ACCEPT), 405, "method_not_allowed")
    key, token = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["*"]},
                                  limit_profile="free")
    raw = Raw(raw_http, url, token)
    await raw.initialize()
    assert (await client.post(f"/api/v1/keys/{key['id']}/disable", headers=admin)).status_code == 200
    assert_error(await raw.post(rpc("ping")), 401, "key_disabled")
    assert (await client.post(f"/api/v1/keys/{key['id']}/enable", headers=admin)).status_code == 200
    # free: 10 requests a minute, MCP requests count like any other (initialize + notification made 2).
    statuses = [(await raw.post(rpc("ping", id_=i))).status_code for i in range(10)]
    assert statuses.count(200) == 8 and statuses[-1] == 429, statuses
    limited = await raw.post(rpc("ping"))
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1 and "ratelimit-limit" in limited.headers
    _, walled = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["*"]},
                                 ip_allowlist=["10.0.0.0/8"])
    assert_error(await Raw(raw_http, url, walled).post(rpc("ping")), 403, "ip_not_allowed")


async def test_progress_is_relayed_as_it_comes_and_elicitation_passes_back(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        raw_http: httpx.AsyncClient) -> None:
    _, token = await register(client, admin, upstream.url)
    progress: list[tuple[float, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, message))

    async def on_elicit(context: Any, params: Any) -> Any:
        from mcp.types import ElicitResult
        assert "Delete /srv/x?" in params.message
        return ElicitResult(action="accept", content={"confirmed": True})

    async with session(f"{base}/mcp/files", token, elicitation_callback=on_elicit) as mcp:
        result = await mcp.call_tool("count", {"steps": 3}, progress_callback=on_progress)
        assert result.content[0].text == "counted 3"
        assert progress == [(1, "step 1"), (2, "step 2"), (3, "step 3")]
        result = await mcp.call_tool("confirm_delete", {"path": "/srv/x"})
        assert result.content[0].text == "deleted /srv/x"

    # Not buffered: the first progress event reaches the client while the tool still waits at its gate.
    raw = Raw(raw_http, f"{base}/mcp/files", token)
    await raw.initialize()
    upstream.gate.clear()
    message = rpc("tools/call", {"name": "gated", "arguments": {}, "_meta": {"progressToken": "g"}}, id_=9)
    async with raw_http.stream("POST", raw.url, content=orjson.dumps(message), headers=raw.headers()) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        seen = b""
        chunks = stream.aiter_bytes()
        while b"waiting at the gate" not in seen:
            seen += await chunks.__anext__()
        assert b"through the gate" not in seen
        upstream.gate.set()
        async for chunk in chunks:
            seen += chunk
        assert b"through the gate" in seen


@pytest.mark.parametrize("answers", ["sse", "json"])
async def test_client_disconnect_cancels_the_upstream_request(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream,
        json_upstream: mcp_upstream.Upstream, raw_http: httpx.AsyncClient, answers: str) -> None:
    """SSE: the client leaves mid-stream. JSON: it leaves while keyplane still waits for the upstream's answer."""
    server = upstream if answers == "sse" else json_upstream
    _, token = await register(client, admin, server.url)
    raw = Raw(raw_http, f"{base}/mcp/files", token)
    await raw.initialize()
    await asyncio.sleep(0.2)
    server.slow_started.clear()
    server.disconnected.clear()
    message = rpc("tools/call", {"name": "slow", "arguments": {"seconds": 20}}, id_=7)
    call = asyncio.create_task(raw_http.post(raw.url, content=orjson.dumps(message), headers=raw.headers()))
    for _ in range(500):
        if server.slow_started.is_set():
            break
        await asyncio.sleep(0.01)
    assert server.slow_started.is_set() and not call.done()
    call.cancel()  # httpx drops the connection
    with contextlib.suppress(asyncio.CancelledError):
        await call
    # The client left: keyplane drops the upstream connection, and the upstream sees it go.
    for _ in range(500):
        if server.disconnected.is_set():
            break
        await asyncio.sleep(0.01)
    assert server.disconnected.is_set()


async def test_upstream_down_slow_or_refusing_gets_keyplane_errors(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], json_upstream: mcp_upstream.Upstream,
        raw_http: httpx.AsyncClient) -> None:
    from tests.processes import free_port

    _, down = await register(client, admin, f"http://127.0.0.1:{free_port()}/mcp", name="down")
    err = assert_error(await Raw(raw_http, f"{base}/mcp/down", down).post(rpc("ping")), 502, "upstream_error")
    assert "down" in err["message"]
    _, slow = await register(client, admin, json_upstream.url, name="slow", timeout_seconds=0.5)
    raw = Raw(raw_http, f"{base}/mcp/slow", slow)
    await raw.initialize()
    resp = await raw.post(rpc("tools/call", {"name": "slow", "arguments": {"seconds": 3}}))
    assert_error(resp, 504, "upstream_timeout")
    # Wrong upstream credentials: the upstream's 401 challenge never reaches the client.
    _, wrong = await register(client, admin, json_upstream.url, name="wrong",
                              headers={"Authorization": "Bearer not-the-right-one-123"})
    resp = await Raw(raw_http, f"{base}/mcp/wrong", wrong).post(rpc("ping"))
    assert_error(resp, 502, "upstream_error")
    assert "not-the-right-one" not in resp.text
    health = (await client.get("/api/v1/mcp-servers/down/health", headers=admin)).json()["health"]
    assert health["reachable"] is False and health["error"]
    health = (await client.get("/api/v1/mcp-servers/slow/health", headers=admin)).json()["health"]
    assert health["reachable"] is True and "read_file" in health["tools"]
    # Disabled: refused before any upstream traffic.
    await client.post("/api/v1/mcp-servers/slow/disable", headers=admin)
    assert_error(await raw.post(rpc("ping")), 503, "server_disabled")


async def test_upstream_secret_and_client_key_stay_on_their_side_and_usage_is_recorded(
        app: KeyplaneApp, base: str, client: httpx.AsyncClient, admin: dict[str, str],
        upstream: mcp_upstream.Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app.kp.settings.access_log = True
    key, token = await create_key(client, admin, scopes=["tools:call", "files:read"],
                                  mcp_servers={"files": ["read_*", "seen_headers", "echo"]})
    body = await register(client, admin, upstream.url)
    async with session(f"{base}/mcp/files", token) as mcp:
        seen = (await mcp.call_tool("seen_headers", {})).structured_content
        await mcp.call_tool("read_file", {"path": "/a"})
    assert seen is not None and "mcp-session-id" in str(seen).lower()
    assert token not in str(seen)
    forwarded = [h for h in upstream.headers if h.get("authorization") == f"Bearer {mcp_upstream.UPSTREAM_TOKEN}"]
    assert forwarded and not any(token in str(h) or "mcp_sk_" in str(h) for h in upstream.headers)
    assert mcp_upstream.UPSTREAM_TOKEN not in str(body) and mcp_upstream.UPSTREAM_TOKEN not in caplog.text
    assert token not in caplog.text
    listed = await client.get("/api/v1/mcp-servers/files", headers=admin)
    assert mcp_upstream.UPSTREAM_TOKEN not in listed.text

    await app.kp.flush_usage()
    events = (await client.get("/api/v1/usage/events", params={"key_id": key["id"]}, headers=admin)).json()["data"]
    calls = [(e["mcp_server"], e["mcp_method"], e["tool"], e["status"]) for e in events]
    assert ("files", "tools/call", "read_file", 200) in calls
    assert ("files", "tools/call", "seen_headers", 200) in calls
    assert ("files", "initialize", None, 200) in calls
    assert all(e["endpoint"] == "/mcp/files" and e["latency_ms"] > 0 for e in events)
    summary = (await client.get("/api/v1/usage/summary", params={"group_by": "tool"}, headers=admin)).json()
    assert {"read_file", "seen_headers"} <= {g["group"] for g in summary["data"]}


@pytest.mark.parametrize("answers", ["event_stream", "json"])
async def test_an_upstream_that_echoes_its_credential_does_not_leak_it(
        answers: str, base: str, client: httpx.AsyncClient, admin: dict[str, str], raw_http: httpx.AsyncClient,
        upstream: mcp_upstream.Upstream, json_upstream: mcp_upstream.Upstream) -> None:
    """The upstream's headers are keyplane's secret: masked in its answers as in its error text, whether the
    answer is JSON or an event stream (stdio servers' output is masked the same way)."""
    chosen = upstream if answers == "event_stream" else json_upstream
    await register(client, admin, chosen.url)
    _, token = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["leaky_headers"]})
    raw = Raw(raw_http, f"{base}/mcp/files", token)
    await raw.initialize()
    resp = await raw.post(rpc("tools/call", {"name": "leaky_headers", "arguments": {}}, 9))
    assert resp.status_code == 200, resp.text
    expected = "text/event-stream" if answers == "event_stream" else "application/json"
    assert resp.headers["content-type"].startswith(expected)
    assert mcp_upstream.UPSTREAM_TOKEN not in resp.text
    echoed = str(reply_of(resp)["result"])
    assert "authorization" in echoed.lower() and r"\u2026" not in resp.text  # masked with the character
    assert "…" in echoed  # masked in place; the answer is still valid JSON-RPC


def test_cli_registers_checks_connects_and_removes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                   upstream: mcp_upstream.Upstream) -> None:
    from typer.testing import CliRunner

    from keyplane.cli import app as cli_app

    for name in [n for n in __import__("os").environ if n.startswith("KEYPLANE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KEYPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FILES_AUTH", f"Bearer {mcp_upstream.UPSTREAM_TOKEN}")
    runner = CliRunner()

    def ok(*args: str) -> str:
        result = runner.invoke(cli_app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    ok("orgs", "create", "default")  # what `keyplane serve` does on first start
    out = ok("mcp-servers", "add", "files", "--url", upstream.url, "--header-env", "Authorization=FILES_AUTH",
             "--tool-scope", "write_file=files:write")
    assert "mcp_sk_" in out and mcp_upstream.UPSTREAM_TOKEN not in out
    assert "files" in ok("mcp-servers", "list")
    shown = orjson.loads(ok("mcp-servers", "show", "files"))
    assert shown["headers"] == ["Authorization"] and shown["tool_scopes"] == {"write_file": "files:write"}
    health = ok("mcp-servers", "health", "files")
    assert "reachable" in health and "read_file" in health
    guide = orjson.loads(ok("connect", "claude-code", "--server", "files", "--mint", "--json",
                            "--url", "http://kp.example:8080"))
    assert guide["mcp_url"] == "http://kp.example:8080/mcp/files" and guide["key"]["mcp_servers"] == {"files": ["*"]}
    assert "mcp_sk_" in guide["snippets"][0]["text"] and "files:write" in guide["key"]["scopes"]
    minted = orjson.loads(ok("keys", "create", "narrow", "-s", "tools:call", "--mcp-server", "files=read_*,echo",
                             "--json"))
    assert minted["key"]["mcp_servers"] == {"files": ["echo", "read_*"]}
    plain = ok("connect", "codex", "--server", "files")
    assert "KEYPLANE_FILES_KEY" in plain and "/mcp/files" in plain
    ok("mcp-servers", "update", "files", "--timeout", "5")
    ok("mcp-servers", "disable", "files")
    ok("mcp-servers", "delete", "files")
    assert runner.invoke(cli_app, ["mcp-servers", "show", "files"]).exit_code == 1


async def test_management_tool_lists_servers_with_health_for_mcp_servers_manage(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream) -> None:
    from tests.conftest import create_sa

    await register(client, admin, upstream.url)
    _, manager = await create_sa(client, admin, ["mcp_servers:manage"], name="mcp-manager")
    _, reader = await create_sa(client, admin, ["virtual_keys:read"], name="reader")
    async with session(f"{base}/mcp", manager, mode="auto") as mcp:
        assert "keyplane_list_mcp_servers" in {t.name for t in (await mcp.list_tools()).tools}
        listed = (await mcp.call_tool("keyplane_list_mcp_servers", {"check_health": True})).structured_content
    assert listed is not None
    [server] = listed["data"]
    assert server["name"] == "files" and server["health"]["reachable"] is True
    assert "read_file" in server["health"]["tools"] and mcp_upstream.UPSTREAM_TOKEN not in str(listed)
    async with session(f"{base}/mcp", reader, mode="auto") as mcp:
        assert "keyplane_list_mcp_servers" not in {t.name for t in (await mcp.list_tools()).tools}
    # Registering through the tool: a manager without virtual_keys:create registers without a key...
    async with session(f"{base}/mcp", manager, mode="auto") as mcp:
        refused = await mcp.call_tool("keyplane_register_mcp_server", {"name": "other", "url": upstream.url})
        assert refused.is_error  # the default key needs virtual_keys:create
        made = await mcp.call_tool("keyplane_register_mcp_server", {"name": "other", "url": upstream.url,
                                                                    "default_key": False})
        assert not made.is_error and made.structured_content["mcp_server"]["path"] == "/mcp/other"
    # ...and an admin token gets the server's key, shown once; the audit names the tool.
    async with session(f"{base}/mcp", admin["Authorization"].split()[1], mode="auto") as mcp:
        made = await mcp.call_tool("keyplane_register_mcp_server", {
            "name": "third", "url": upstream.url, "tool_scopes": {"write_file": "files:write"}})
        assert made.structured_content["secret"].startswith("mcp_sk_")
    audit = (await client.get("/api/v1/audit", params={"action": "keyplane_register_mcp_server"},
                              headers=admin)).json()["data"]
    # (refused calls are audited too, with their reason and no change)
    assert {e["details"].get("change") for e in audit} >= {"mcp_server.create", "virtual_key.create"}


async def test_dashboard_lists_registers_checks_health_disables_and_deletes(
        app: KeyplaneApp, client: httpx.AsyncClient, admin_token: str, upstream: mcp_upstream.Upstream) -> None:
    import re

    assert (await client.post("/ui/login", data={"token": admin_token})).status_code == 303
    page = await client.get("/ui/mcp-servers")
    assert page.status_code == 200 and "No MCP servers yet." in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    form = {"csrf": csrf.group(1), "name": "files", "url": upstream.url,
            "headers": f"Authorization: Bearer {mcp_upstream.UPSTREAM_TOKEN}", "tool_scopes": "write_file files:write"}
    created = await client.post("/ui/mcp-servers", data=form)
    assert created.status_code == 201, created.text
    assert "mcp_sk_" in created.text and mcp_upstream.UPSTREAM_TOKEN not in created.text
    assert "Authorization" in created.text and "files:write" in created.text
    health = await client.get("/ui/mcp-servers/files/health")
    assert health.status_code == 200 and "Reachable" in health.text and "read_file" in health.text
    # Usage by server and by tool (a call the upstream refused counts too).
    key = re.search(r'<code id="mcp-key">(mcp_sk_[A-Za-z0-9]+)</code>', created.text)
    assert key is not None
    refused = await client.post("/mcp/files", content=orjson.dumps(rpc("tools/call", {"name": "nope"})),
                                headers={**ACCEPT, **bearer(key.group(1))})
    assert refused.status_code == 400, refused.text  # the upstream wants a session: its 400 is relayed
    await app.kp.flush_usage()
    page = await client.get("/ui/mcp-servers")
    assert "Last 24 hours" in page.text and "<td>nope</td>" in page.text
    guide = await client.get("/ui/mcp-servers/files/connect", params={"client": "cursor"})
    assert guide.status_code == 200 and "/mcp/files" in guide.text and "KEYPLANE_FILES_KEY" in guide.text
    minted = await client.post("/ui/mcp-servers/files/connect", data={"csrf": csrf.group(1), "client": "codex"})
    assert minted.status_code == 200 and "mcp_sk_" in minted.text and "codex mcp add files" in minted.text
    bad = await client.post("/ui/mcp-servers", data={**form, "name": "bad", "headers": "no colon here"})
    assert bad.status_code == 400 and "headers" in bad.text
    disabled = await client.post("/ui/mcp-servers/files/disable", data={"csrf": csrf.group(1)})
    assert disabled.status_code == 303
    assert ">disabled<" in (await client.get("/ui/mcp-servers")).text
    assert (await client.post("/ui/mcp-servers/files/delete", data={"csrf": csrf.group(1)})).status_code == 303
    assert "No MCP servers yet." in (await client.get("/ui/mcp-servers")).text


class _ScriptedAnswer:
    """An upstream answer given as chunks, cut wherever the test likes (an upstream abstraction double)."""

    def __init__(self, content_type: str, parts: list[bytes]) -> None:
        self.status = 200
        self.headers = {"content-type": content_type}
        self.parts = parts

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part

    async def read(self, limit: int) -> bytes:
        return b"".join(self.parts)

    def close(self) -> None:
        pass


async def test_list_answers_are_filtered_however_the_stream_is_cut(app: KeyplaneApp, client: httpx.AsyncClient,
                                                                   admin: dict[str, str]) -> None:
    tools = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "secret_tool"}, {"name": "read_x"}],
                                                    "prompts": [{"name": "p"}]}}
    data = b"data: " + orjson.dumps(tools)
    answers = [
        ("text/event-stream", [b"event: message\r\n", data[:20], data[20:] + b"\r\n\r\n"]),
        ("text/event-stream", [b": ping\n\n", data + b"\n"]),  # the last event lacks its blank line
        ("application/json", [orjson.dumps(tools)]),
    ]

    class Scripted:
        async def open(self, route: Any, method: str, headers: dict[str, str], body: bytes) -> _ScriptedAnswer:
            return _ScriptedAnswer(*answers.pop(0))

        async def close(self) -> None:
            pass

    app.mcp_gateway.upstream = Scripted()
    await register(client, admin, "http://127.0.0.1:9/mcp")
    _, token = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["read_*"]})
    for _ in range(3):
        resp = await client.post("/mcp/files", content=orjson.dumps(rpc("tools/list")),
                                 headers={**ACCEPT, **bearer(token)})
        assert resp.status_code == 200, resp.text
        assert b"secret_tool" not in resp.content and b"read_x" in resp.content
        assert reply_of(resp)["result"]["prompts"] == []  # no prompts:read


async def test_the_2026_stateless_protocol_passes_with_its_routing_headers(
        base: str, client: httpx.AsyncClient, admin: dict[str, str], upstream: mcp_upstream.Upstream) -> None:
    _, token = await create_key(client, admin, scopes=["tools:call", "files:read"],
                                mcp_servers={"files": ["read_*", "echo"]})
    await register(client, admin, upstream.url)
    upstream.headers.clear()
    async with session(f"{base}/mcp/files", token, mode="2026-07-28") as mcp:
        assert {t.name for t in (await mcp.list_tools()).tools} == {"read_file", "read_dir", "echo"}
        assert (await mcp.call_tool("read_file", {"path": "/a"})).content[0].text == "contents of /a"
        with pytest.raises(MCPError):
            await mcp.call_tool("write_file", {"path": "/a", "text": "x"})
    calls = [h for h in upstream.headers if h.get("mcp-method") == "tools/call"]
    assert calls and all(h.get("mcp-name") == "read_file" for h in calls)  # carried up; write_file never arrived


async def test_alert_rules_watch_one_mcp_server(
        app: KeyplaneApp, base: str, client: httpx.AsyncClient, admin: dict[str, str],
        json_upstream: mcp_upstream.Upstream, raw_http: httpx.AsyncClient) -> None:
    from tests.processes import free_port

    app.kp.alerts.retry_delays = ()
    _, down = await register(client, admin, f"http://127.0.0.1:{free_port()}/mcp", name="down")
    _, fine = await register(client, admin, json_upstream.url, name="fine")
    hook = "http://127.0.0.1:9/hook"
    rules = {}
    for server in ("down", "fine"):
        resp = await client.post("/api/v1/alerts", json={"name": f"errors-{server}", "kind": "error_rate",
                                                         "threshold": 0.5, "min_requests": 3, "mcp_server": server,
                                                         "webhook_url": hook}, headers=admin)
        assert resp.status_code == 201, resp.text
        assert resp.json()["alert"]["mcp_server"] == server
        rules[server] = resp.json()["alert"]["id"]
    for _ in range(3):
        assert (await Raw(raw_http, f"{base}/mcp/down", down).post(rpc("ping"))).status_code == 502
    raw = Raw(raw_http, f"{base}/mcp/fine", fine)
    await raw.initialize()
    for i in range(3):
        assert (await raw.post(rpc("ping", id_=i + 10))).status_code == 200
    await app.kp.flush_usage()
    assert await app.kp.alerts.evaluate() == [rules["down"]]  # the healthy server's rule stays quiet
    key, _ = await create_key(client, admin)
    assert_error(await client.post("/api/v1/alerts", json={"name": "b", "kind": "budget", "key_id": key["id"],
                                                           "threshold": 0.5, "mcp_server": "down",
                                                           "webhook_url": hook}, headers=admin),
                 400, "invalid_request")


async def test_browser_clients_preflight_and_read_answers_from_allowed_origins(
        app: KeyplaneApp, base: str, client: httpx.AsyncClient, admin: dict[str, str],
        upstream: mcp_upstream.Upstream) -> None:
    """MCP Inspector and other browser clients send a CORS preflight; allowed origins as at /mcp."""
    _, secret = await register(client, admin, upstream.url)
    inspector = "http://localhost:6274"
    asked = {"Origin": inspector, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id, mcp-protocol-version"}
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.options(f"{base}/mcp/files", headers=asked)
        assert resp.status_code == 204, resp.text
        assert resp.headers["access-control-allow-origin"] == inspector
        assert "POST" in resp.headers["access-control-allow-methods"]
        allowed = resp.headers["access-control-allow-headers"].lower()
        for name in ("authorization", "mcp-session-id", "mcp-protocol-version", "last-event-id", "content-type"):
            assert name in allowed
        assert "mcp-session-id" in resp.headers["access-control-expose-headers"].lower()
        assert "origin" in resp.headers["vary"].lower()

        # Another origin: no CORS header, a refusal in the error shape.
        other = await http.options(f"{base}/mcp/files", headers={**asked, "Origin": "https://evil.example"})
        assert_error(other, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in other.headers

        # The real requests carry the CORS answer headers, refusals included, and the session id is readable.
        refused = await http.post(f"{base}/mcp/files", json=rpc("ping"), headers={**ACCEPT, "Origin": inspector})
        assert_error(refused, 401, "missing_bearer")
        assert refused.headers["access-control-allow-origin"] == inspector
        init = await http.post(f"{base}/mcp/files", headers={**ACCEPT, **bearer(secret), "Origin": inspector},
                               json=rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                       "clientInfo": CLIENT_INFO}))
        assert init.status_code == 200 and init.headers["mcp-session-id"]
        assert init.headers["access-control-allow-origin"] == inspector
        assert "mcp-session-id" in init.headers["access-control-expose-headers"].lower()
        plain = await http.post(f"{base}/mcp/files", json=rpc("ping"), headers=ACCEPT)
        assert "access-control-allow-origin" not in plain.headers


async def test_anonymous_mcp_gateway_requests_write_no_usage_rows(app: KeyplaneApp, client: httpx.AsyncClient,
                                                                   admin: dict[str, str]) -> None:
    """As on /v1/*: a request no key vouches for is counted in the metrics, never stored."""
    await register(client, admin, "http://127.0.0.1:9/mcp")
    for i in range(6):
        headers = {**ACCEPT, **({"Authorization": f"Bearer mcp_sk_junk{i}"} if i % 2 else {})}
        assert (await client.post("/mcp/files", json=rpc("ping"), headers=headers)).status_code in (401, 429)
    assert (await client.options("/mcp/files", headers={"Origin": "http://localhost:6274"})).status_code == 204
    await app.kp.flush_usage()
    events = (await client.get("/api/v1/usage/events", headers=admin)).json()["data"]
    assert events == []
    async with app.kp.db.read() as s:
        anonymous = (await s.execute(select(func.count()).select_from(UsageEvent)
                                     .where(UsageEvent.org_id.is_(None)))).scalar_one()
    assert anonymous == 0


async def test_tasks_are_bound_to_the_key_and_tool_that_created_them(app: KeyplaneApp, client: httpx.AsyncClient,
                                                                      admin: dict[str, str]) -> None:
    """MCP 2025-11-25 tasks: tasks/get, tasks/result, tasks/cancel act on a task only for the key whose
    tools/call created it, while it may still call that tool; tasks/list shows a key its own tasks."""
    sent: list[dict[str, Any]] = []

    class TasksUpstream:
        """An upstream double answering the tasks methods as a tasks-capable server does."""

        async def open(self, route: Any, method: str, headers: dict[str, str], body: bytes) -> _ScriptedAnswer:
            message = orjson.loads(body)
            sent.append(message)
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
            params = message.get("params", {})
            if message["method"] == "tools/call":
                task_id = f"task-{len(sent)}"
                reply["result"] = {"task": {"taskId": task_id, "status": "working", "ttl": 60000}}
                if params["name"] == "slow_stream":  # a task created in an SSE answer
                    return _ScriptedAnswer("text/event-stream", [b"event: message\ndata: ", orjson.dumps(reply),
                                                                 b"\n\n"])
            elif message["method"] == "tasks/list":
                reply["result"] = {"tasks": [{"taskId": "task-1", "status": "working"},
                                             {"taskId": "task-2", "status": "working"},
                                             {"taskId": "someone-elses", "status": "completed"}]}
            elif message["method"] == "tasks/result":
                reply["result"] = {"content": [{"type": "text", "text": f"done {params['taskId']}"}]}
            else:
                reply["result"] = {"taskId": params["taskId"], "status": "working"}
            return _ScriptedAnswer("application/json", [orjson.dumps(reply)])

        async def close(self) -> None:
            pass

    app.mcp_gateway.upstream = TasksUpstream()
    await register(client, admin, "http://127.0.0.1:9/mcp")
    creator, creator_token = await create_key(client, admin, scopes=["tools:call"],
                                              mcp_servers={"files": ["slow_*"]})
    _, other_token = await create_key(client, admin, scopes=["tools:call"], mcp_servers={"files": ["*"]})

    async def call(token: str, method: str, params: dict[str, Any]) -> httpx.Response:
        return await client.post("/mcp/files", content=orjson.dumps(rpc(method, params)),
                                 headers={**ACCEPT, **bearer(token)})

    made = await call(creator_token, "tools/call", {"name": "slow_job", "arguments": {}, "task": {"ttl": 60000}})
    assert made.status_code == 200 and reply_of(made)["result"]["task"]["taskId"] == "task-1"
    streamed = await call(creator_token, "tools/call", {"name": "slow_stream", "arguments": {},
                                                        "task": {"ttl": 60000}})
    assert streamed.status_code == 200 and reply_of(streamed)["result"]["task"]["taskId"] == "task-2"

    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        resp = await call(creator_token, method, {"taskId": "task-1"})
        assert resp.status_code == 200, (method, resp.text)
        # Another key of the same server cannot reach it (the upstream sees one client for every key).
        assert_error(await call(other_token, method, {"taskId": "task-1"}), 404, "not_found")
    assert reply_of(await call(creator_token, "tasks/result", {"taskId": "task-2"}))["result"]["content"][0][
        "text"] == "done task-2"
    listed = reply_of(await call(creator_token, "tasks/list", {}))["result"]["tasks"]
    assert [t["taskId"] for t in listed] == ["task-1", "task-2"]
    assert reply_of(await call(other_token, "tasks/list", {}))["result"]["tasks"] == []
    # A task this process did not see created (another process, a restart): access to the server decides.
    assert (await call(other_token, "tasks/get", {"taskId": "made-elsewhere"})).status_code == 200

    # Narrowed so that it may no longer call the task's tool: the task's result is refused too.
    resp = await client.patch(f"/api/v1/keys/{creator['id']}", json={"mcp_servers": {"files": ["slow_stream"]}},
                              headers=admin)
    assert resp.status_code == 200, resp.text
    err = assert_scope_refusal(await call(creator_token, "tasks/result", {"taskId": "task-1"}), "tools:call",
                               "tool_not_allowed")
    assert err["tool"] == "slow_job"
    assert (await call(creator_token, "tasks/result", {"taskId": "task-2"})).status_code == 200
    refused_upstream = [m for m in sent if m["method"].startswith("tasks/") and m["params"].get("taskId") == "task-1"]
    assert len(refused_upstream) == 3  # only the creator's three calls before the narrowing went up
