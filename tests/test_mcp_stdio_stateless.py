"""stdio MCP servers beyond one session in one process (issue 15): the stateless 2026-07-28 protocol served
from keyplane's own pool of processes, processes stopped at once when their server is disabled, deleted or
changed (here and in another keyplane process), and a session that reaches the wrong worker.

Servers no one here wrote (`npm ci --prefix tests/mcp_ts_client`): server-filesystem and server-everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from mcp.shared.exceptions import MCPError

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key
from tests.processes import serve
from tests.test_mcp_gateway import ACCEPT, rpc, session
from tests.test_mcp_stdio import EVERYTHING, FILESYSTEM, NODE, READ_ONLY, alive, initialize, register, until

MODERN = "2026-07-28"


@contextlib.asynccontextmanager
async def running(settings_factory: Any, **overrides: Any) -> AsyncIterator[tuple[KeyplaneApp, str]]:
    """A keyplane (one of possibly several sharing a store) serving real HTTP."""
    settings = {"mcp_stdio_commands": "node", "mcp_stdio_max_sessions": 4, "mcp_stdio_idle_seconds": 60,
                "mcp_stdio_start_seconds": 20, "mcp_stdio_pool_size": 2, **overrides}
    app = KeyplaneApp(settings_factory(**settings))
    await app.startup()
    try:
        async with serve(app) as base:
            yield app, base
    finally:
        await app.shutdown()


def admin_of(app: KeyplaneApp) -> dict[str, str]:
    assert app.bootstrap is not None and app.bootstrap.admin_token
    return bearer(app.bootstrap.admin_token)


def stateless(method: str, params: dict[str, Any] | None = None, id_: int = 1, **meta: Any) -> dict[str, Any]:
    envelope = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "raw-2026", "version": "1"}, **meta}
    return rpc(method, {**(params or {}), "_meta": envelope}, id_)


def stateless_headers(token: str, message: dict[str, Any], version: str = MODERN) -> dict[str, str]:
    headers = {**ACCEPT, **bearer(token), "MCP-Protocol-Version": version, "Mcp-Method": message["method"]}
    name = (message.get("params") or {}).get("name")
    if message["method"] == "tools/call" and name:
        headers["Mcp-Name"] = name
    return headers


async def post_stateless(http: httpx.AsyncClient, url: str, token: str, message: dict[str, Any],
                         version: str = MODERN) -> httpx.Response:
    return await http.post(url, content=orjson.dumps(message), headers=stateless_headers(token, message, version))


def processes(app: KeyplaneApp, name: str, pooled: bool | None = None) -> list[int]:
    return [s.process.pid for s in app.mcp_upstream.stdio.sessions.values()
            if s.route.name == name and (pooled is None or s.pooled == pooled)]


def reply(resp: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response of a JSON answer or of an event stream's last message."""
    if resp.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
        return orjson.loads(data[-1])
    return resp.json()


async def test_the_2026_protocol_is_served_by_processes_keyplane_initialized(settings_factory: Any,
                                                                             tmp_path: Path) -> None:
    """An SDK client on the stateless protocol gets the filesystem server's tools, filtered to its key, with no
    session; keyplane's pool processes answer, at most the pool size however many requests run at once."""
    (tmp_path / "notes.txt").write_text("hello, stateless")
    async with running(settings_factory) as (app, base):
        admin = admin_of(app)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(tmp_path)],
                           tool_scopes={"write_file": "files:write"})
            _, reader = await create_key(http, admin, scopes=["tools:call", "files:read"],
                                         mcp_servers={"fs": READ_ONLY})
            for mode in (MODERN, "auto"):  # "auto" asks server/discover first, which keyplane answers
                async with session(f"{base}/mcp/fs", reader, mode=mode) as mcp:
                    assert mcp.protocol_version == MODERN
                    names = {t.name for t in (await mcp.list_tools()).tools}
                    assert "read_text_file" in names and "write_file" not in names
                    read = await mcp.call_tool("read_text_file", {"path": str(tmp_path / "notes.txt")})
                    assert read.content[0].text == "hello, stateless"
                    with pytest.raises(MCPError):
                        await mcp.call_tool("write_file", {"path": str(tmp_path / "x"), "content": "no"})
            assert not (tmp_path / "x").exists()
            assert processes(app, "fs", pooled=False) == []  # no client session: keyplane's own processes
            assert 1 <= len(processes(app, "fs", pooled=True)) <= 2
            # Many at once, each with its own id (the same for all): every answer carries its client's id back.
            calls = [stateless("tools/call", {"name": "list_directory", "arguments": {"path": str(tmp_path)}}, 7)
                     for _ in range(6)]
            answers = await asyncio.gather(*(post_stateless(http, "/mcp/fs", reader, c) for c in calls))
            for resp in answers:
                assert resp.status_code == 200, resp.text
                assert "mcp-session-id" not in resp.headers
                answer = reply(resp)
                assert answer["id"] == 7 and "notes.txt" in answer["result"]["content"][0]["text"]
                assert answer["result"]["resultType"] == "complete"
            assert 1 <= len(processes(app, "fs", pooled=True)) <= 2
            health = (await http.get("/api/v1/mcp-servers/fs/health", headers=admin)).json()["health"]
            assert health["process"]["stateless_processes"] == len(processes(app, "fs", pooled=True))
            # The pool runs the server's settings of the moment: changed, its processes stop and new ones start.
            pool = processes(app, "fs", pooled=True)
            changed = await http.patch("/api/v1/mcp-servers/fs", json={"cwd": str(tmp_path)}, headers=admin)
            assert changed.status_code == 200, changed.text
            await until(lambda: not processes(app, "fs") and not any(alive(p) for p in pool), 10)
            again = await post_stateless(http, "/mcp/fs", reader, calls[0])
            assert again.status_code == 200 and reply(again)["id"] == 7
            assert processes(app, "fs", pooled=True) and not set(processes(app, "fs", pooled=True)) & set(pool)


async def test_each_key_has_its_own_processes_and_an_idle_one_makes_room(settings_factory: Any,
                                                                          tmp_path: Path) -> None:
    """A stdio server may keep state between calls (a browser, a REPL, a scratch file): what one key's calls
    leave behind must never be seen by another key, so each key's stateless requests get their own processes.
    At the cap, the least recently used idle pool process of another key is stopped to make room."""
    async with running(settings_factory, mcp_stdio_max_sessions=2) as (app, base):
        admin = admin_of(app)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(tmp_path)])
            owners: dict[str, list[int]] = {}
            for name in ("a", "b", "c"):
                key, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"fs": ["*"]})
                resp = await post_stateless(http, "/mcp/fs", token, stateless("tools/list"))
                assert resp.status_code == 200, resp.text
                owners[name] = [s.process.pid for s in app.mcp_upstream.stdio.sessions.values()
                                if s.pooled and s.owner == key["id"]]
                assert len(owners[name]) == 1
            assert len({owners[n][0] for n in owners}) == 3  # three keys, three processes
            # The cap is 2: the third key's process took the place of the first key's (idle, least recent).
            await until(lambda: not alive(owners["a"][0]), 10)
            assert sorted(processes(app, "fs")) == sorted(owners["b"] + owners["c"])


async def test_stateless_progress_and_refusals(settings_factory: Any) -> None:
    async with running(settings_factory) as (app, base):
        admin = admin_of(app)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "everything", [NODE, str(EVERYTHING), "stdio"])
            _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"everything": ["*"]})
            progress: list[float] = []

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                progress.append(done)

            async with session(f"{base}/mcp/everything", token, mode=MODERN) as mcp:
                long = await mcp.call_tool("trigger-long-running-operation", {"duration": 0.3, "steps": 3},
                                           progress_callback=on_progress)
                assert "completed" in long.content[0].text.lower()
            assert progress == [1, 2, 3]  # the client's progress token came back, not keyplane's
            url = "/mcp/everything"
            discovered = (await post_stateless(http, url, token, stateless("server/discover"))).json()["result"]
            assert discovered["supportedVersions"] == [MODERN] and "tools" in discovered["capabilities"]
            assert "logging" not in discovered["capabilities"]  # a per-connection setting: refused below
            assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["name"]
            # State per connection would be shared by every client of a pool process: refused, with a way out.
            level = await post_stateless(http, url, token, stateless("logging/setLevel", {"level": "debug"}))
            assert level.status_code == 400 and "initialize a session" in level.json()["error"]["message"]
            unknown = await post_stateless(http, url, token, stateless(
                "tools/list", **{"io.modelcontextprotocol/protocolVersion": "2099-01-01"}), version="2099-01-01")
            assert unknown.status_code == 400 and unknown.json()["error"]["code"] == -32022
            assert MODERN in unknown.json()["error"]["data"]["supported"]
            # Without the version header or the envelope, a request still needs a session.
            bare = await http.post(url, json=rpc("tools/list"), headers={**ACCEPT, **bearer(token)})
            assert bare.status_code == 400 and "initialize" in bare.json()["error"]["message"]
            # A pool process that crashes is replaced by the next request.
            [crashed] = processes(app, "everything", pooled=True)
            os.kill(crashed, signal.SIGKILL)
            await until(lambda: not processes(app, "everything") and not alive(crashed), 10)
            listed = await post_stateless(http, url, token, stateless("tools/list", id_=9))
            assert listed.status_code == 200 and reply(listed)["id"] == 9, listed.text
            assert processes(app, "everything", pooled=True) != [crashed]


async def test_a_changed_disabled_or_deleted_server_stops_its_processes_at_once(settings_factory: Any,
                                                                                 tmp_path: Path) -> None:
    """Not at the idle timeout (60 s here): at once, and the session's next request says why."""
    async with running(settings_factory) as (app, base):
        admin = admin_of(app)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(tmp_path)])
            _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"fs": ["*"]})

            async def opened() -> tuple[dict[str, str], list[int]]:
                resp = await initialize(http, "fs", token)
                assert resp.status_code == 200, resp.text
                running_now = processes(app, "fs")
                assert len(running_now) == 1
                return {**ACCEPT, **bearer(token), "Mcp-Session-Id": resp.headers["mcp-session-id"]}, running_now

            headers, pids = await opened()
            changed = await http.patch("/api/v1/mcp-servers/fs", json={"env": {"FS_MODE": "new"}}, headers=admin)
            assert changed.status_code == 200, changed.text
            await until(lambda: not processes(app, "fs") and not any(alive(p) for p in pids), 10)
            late = await http.post("/mcp/fs", headers=headers, json=rpc("tools/list"))
            assert late.status_code == 404 and "command, env or cwd changed" in late.json()["error"]["message"]

            headers, pids = await opened()
            assert (await http.post("/api/v1/mcp-servers/fs/disable", headers=admin)).status_code == 200
            await until(lambda: not processes(app, "fs") and not any(alive(p) for p in pids), 10)
            assert_error(await http.post("/mcp/fs", headers=headers, json=rpc("tools/list")), 503, "server_disabled")

            assert (await http.post("/api/v1/mcp-servers/fs/enable", headers=admin)).status_code == 200
            headers, pids = await opened()
            assert (await http.delete("/api/v1/mcp-servers/fs", headers=admin)).status_code == 200
            await until(lambda: not processes(app, "fs") and not any(alive(p) for p in pids), 10)
            assert_error(await http.post("/mcp/fs", headers=headers, json=rpc("tools/list")), 404, "not_found")


async def test_several_keyplane_processes(settings_factory: Any, tmp_path: Path) -> None:
    """Two keyplane processes on one store, as `--workers 2` runs them: a stateless request is answered by
    either; a session reaching the other one gets a clear 421; a server disabled through one stops the other's
    processes too (through the change feed, or the Redis bus in the distributed mode)."""
    async with running(settings_factory, workers=2) as (first, first_url), \
            running(settings_factory, workers=2) as (second, second_url):
        admin = admin_of(first)
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(f"{first_url}/api/v1/mcp-servers", headers=admin, json={
                "name": "fs", "command": [NODE, str(FILESYSTEM), str(tmp_path)], "default_key": False})
            assert resp.status_code == 201, resp.text
            _, token = await create_key(httpx.AsyncClient(base_url=first_url, timeout=30), admin,
                                        scopes=["tools:call"], mcp_servers={"fs": ["*"]})
            start = rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                       "clientInfo": {"name": "raw", "version": "1"}})
            opened = await http.post(f"{first_url}/mcp/fs", headers={**ACCEPT, **bearer(token)}, json=start)
            assert opened.status_code == 200, opened.text
            theirs_opened = await until_opened(http, f"{second_url}/mcp/fs", token, start)
            elsewhere = await http.post(f"{second_url}/mcp/fs", json=rpc("tools/list"), headers={
                **ACCEPT, **bearer(token), "Mcp-Session-Id": opened.headers["mcp-session-id"]})
            err = assert_error(elsewhere, 421, "session_elsewhere")
            assert "another keyplane worker" in err["message"]
            theirs = processes(second, "fs")
            assert len(theirs) == 1 and theirs_opened.status_code == 200
            # The stateless protocol needs no affinity: either process answers.
            call = stateless("tools/call", {"name": "list_allowed_directories", "arguments": {}}, 3)
            for url in (first_url, second_url):
                resp = await post_stateless(http, f"{url}/mcp/fs", token, call)
                assert resp.status_code == 200 and reply(resp)["id"] == 3, resp.text
            theirs = processes(second, "fs")
            assert len(theirs) == 2
            assert theirs and all(alive(p) for p in theirs)
            assert (await http.post(f"{first_url}/api/v1/mcp-servers/fs/disable", headers=admin)).status_code == 200
            await until(lambda: not processes(second, "fs") and not any(alive(p) for p in theirs), 10)
            await until(lambda: not processes(first, "fs"), 10)


async def until_opened(http: httpx.AsyncClient, url: str, token: str, start: dict[str, Any]) -> httpx.Response:
    """A keyplane process that has not yet seen a new server answers 404 until its change feed catches up."""
    for _ in range(200):
        resp = await http.post(url, headers={**ACCEPT, **bearer(token)}, json=start)
        if resp.status_code != 404:
            assert resp.status_code == 200, resp.text
            return resp
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never served the server")


async def test_a_request_that_arrives_before_the_change_notice_finds_the_change(tmp_path: Path) -> None:
    """The notice of a change may lag (another process, a slow audit feed): the route a request carries is
    the newest, and a process started with other settings is not used for it."""
    import dataclasses

    from keyplane.config import Settings
    from keyplane.gateway.mcp_stdio import StdioUpstream
    from keyplane.services.mcp_servers import McpRoute

    stdio = StdioUpstream(Settings(home=tmp_path / "home", mcp_stdio_commands="node"))
    route = McpRoute(server_id="mcp_1", org_id="org_1", name="fs", url="", headers=(), transport="stdio",
                     command=(NODE, str(FILESYSTEM), str(tmp_path)))
    listing = stateless("tools/list")
    try:
        opened = await stdio.open(route, "POST", {}, orjson.dumps(rpc("initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}})))
        assert opened.status == 200
        session_id = opened.headers["mcp-session-id"]
        assert session_id.startswith(stdio.tag + ".")
        pooled = await stdio.open(route, "POST", {"mcp-protocol-version": MODERN}, orjson.dumps(listing))
        assert pooled.status == 200 and orjson.loads(await pooled.read(1 << 20))["result"]["tools"]
        old = [s.process.pid for s in stdio.sessions.values()]
        assert len(old) == 2
        changed = dataclasses.replace(route, env=(("FS_MODE", "new"),))
        gone = await stdio.open(changed, "POST", {"mcp-session-id": session_id}, orjson.dumps(rpc("tools/list")))
        assert gone.status == 404 and b"command, env or cwd changed" in await gone.read(1 << 20)
        again = await stdio.open(changed, "POST", {"mcp-protocol-version": MODERN}, orjson.dumps(listing))
        assert again.status == 200
        assert [s.route for s in stdio.sessions.values()] == [changed]
        await until(lambda: not any(alive(p) for p in old), 10)
    finally:
        await stdio.close()
