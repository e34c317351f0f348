"""stdio MCP servers keyplane runs (issue 15), with servers no one here wrote, installed by `npm ci` in
tests/mcp_ts_client: `@modelcontextprotocol/server-filesystem` over a temporary directory and
`@modelcontextprotocol/server-everything` in its stdio mode. Clients: the official Python SDK and raw HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key, create_sa
from tests.processes import serve
from tests.test_mcp_gateway import ACCEPT, CLIENT_INFO, rpc, session

NODE = "node"  # as written in the allow-list (found on PATH)
MODULES = Path(__file__).parent / "mcp_ts_client" / "node_modules" / "@modelcontextprotocol"
FILESYSTEM = MODULES / "server-filesystem" / "dist" / "index.js"
EVERYTHING = MODULES / "server-everything" / "dist" / "index.js"
ENV_SECRET = "stdio-env-secret-7f3a9c"
READ_ONLY = ["read_*", "list_*", "directory_tree", "search_files", "get_file_info"]


def test_the_stdio_servers_are_installed() -> None:
    """`npm ci --prefix tests/mcp_ts_client` installs them (make test does); CI must not silently skip them."""
    assert shutil.which("node") and FILESYSTEM.is_file() and EVERYTHING.is_file(), \
        "run `npm ci --prefix tests/mcp_ts_client`"


@pytest.fixture
async def stdio_app(settings_factory: Any) -> AsyncIterator[KeyplaneApp]:
    application = KeyplaneApp(settings_factory(
        mcp_stdio_commands=f"node,{sys.executable}", mcp_stdio_max_sessions=2, mcp_stdio_idle_seconds=30,
        mcp_stdio_start_seconds=20))
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def kp(stdio_app: KeyplaneApp) -> AsyncIterator[tuple[KeyplaneApp, httpx.AsyncClient, dict[str, str], str]]:
    assert stdio_app.bootstrap is not None and stdio_app.bootstrap.admin_token
    admin = bearer(stdio_app.bootstrap.admin_token)
    async with serve(stdio_app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        yield stdio_app, http, admin, base


async def register(http: httpx.AsyncClient, admin: dict[str, str], name: str, command: list[str],
                   **fields: Any) -> dict[str, Any]:
    resp = await http.post("/api/v1/mcp-servers", json={"name": name, "command": command, "default_key": False,
                                                        **fields}, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["mcp_server"]


async def initialize(http: httpx.AsyncClient, name: str, token: str) -> httpx.Response:
    return await http.post(f"/mcp/{name}", headers={**ACCEPT, **bearer(token)}, json=rpc("initialize", {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": CLIENT_INFO}))


def pids(app: KeyplaneApp, name: str) -> list[int]:
    return [s.process.pid for s in app.mcp_upstream.stdio.sessions.values() if s.route.name == name]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def until(condition: Any, seconds: float = 30.0) -> None:
    """Wait for ``condition()`` on the wall clock: generous, since node starts slowly on a loaded machine."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_a_read_only_key_lists_and_reads_files_but_cannot_write(kp: Any, tmp_path: Path) -> None:
    app, http, admin, base = kp
    root = tmp_path / "files"
    root.mkdir()
    (root / "notes.txt").write_text("hello from the host")
    server = await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(root)],
                            tool_scopes={"write_file": "files:write", "edit_file": "files:write"})
    assert server["transport"] == "stdio" and server["url"] is None and server["command"][0] == NODE
    _, reader = await create_key(http, admin, scopes=["tools:call", "files:read"], mcp_servers={"fs": READ_ONLY})
    async with session(f"{base}/mcp/fs", reader) as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        assert "read_text_file" in names and "list_directory" in names
        assert not names & {"write_file", "edit_file", "move_file", "create_directory"}  # filtered away
        listing = await mcp.call_tool("list_directory", {"path": str(root)})
        assert "notes.txt" in listing.content[0].text
        read = await mcp.call_tool("read_text_file", {"path": str(root / "notes.txt")})
        assert read.content[0].text == "hello from the host"
        with pytest.raises(MCPError):
            await mcp.call_tool("write_file", {"path": str(root / "x.txt"), "content": "nope"})
    assert not (root / "x.txt").exists()
    # A key holding the tool's own scope writes (the same server, the same gateway rules).
    _, writer = await create_key(http, admin, scopes=["tools:call", "files:write"], mcp_servers={"fs": ["*"]})
    async with session(f"{base}/mcp/fs", writer) as mcp:
        await mcp.call_tool("write_file", {"path": str(root / "x.txt"), "content": "yes"})
    assert (root / "x.txt").read_text() == "yes"
    await app.kp.flush_usage()
    events = (await http.get("/api/v1/usage/events", params={"limit": 100}, headers=admin)).json()["data"]
    refused = [e for e in events if e["tool"] == "write_file" and e["status"] == 403]
    assert refused and refused[0]["code"] == "insufficient_scope" and refused[0]["mcp_server"] == "fs"


async def test_server_requests_and_progress_cross_the_bridge_both_ways(kp: Any) -> None:
    """server-everything asks the client for a sampling (a server-to-client request over stdio) and reports
    progress; both reach the SDK client through keyplane, and its answer goes back to the process."""
    from mcp.types import CreateMessageResult, TextContent

    _, http, admin, base = kp
    await register(http, admin, "everything", [NODE, str(EVERYTHING), "stdio"])
    _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"everything": ["*"]})
    asked: list[str] = []
    progress: list[float] = []

    async def on_sampling(context: Any, params: Any) -> Any:
        asked.append(params.messages[0].content.text)
        return CreateMessageResult(role="assistant", content=TextContent(type="text", text="sampled-by-the-client"),
                                   model="test-model")

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async with session(f"{base}/mcp/everything", token, sampling_callback=on_sampling) as mcp:
        deadline = time.monotonic() + 30  # it registers its sampling tool once it knows the client can sample
        while "trigger-sampling-request" not in {t.name for t in (await mcp.list_tools()).tools}:
            assert time.monotonic() < deadline, "server-everything never offered trigger-sampling-request"
            await asyncio.sleep(0.05)
        result = await mcp.call_tool("trigger-sampling-request", {"prompt": "ping", "maxTokens": 5})
        assert "sampled-by-the-client" in result.content[0].text
        long = await mcp.call_tool("trigger-long-running-operation", {"duration": 0.3, "steps": 3},
                                   progress_callback=on_progress)
        assert "completed" in long.content[0].text.lower()
    assert asked and "ping" in asked[0]
    assert progress == [1, 2, 3]


async def test_sessions_are_separate_processes_capped_and_ended_by_delete(kp: Any, tmp_path: Path) -> None:
    app, http, admin, _ = kp
    await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(tmp_path)])
    _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"fs": ["*"]})
    first, second = await asyncio.gather(initialize(http, "fs", token), initialize(http, "fs", token))
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["mcp-session-id"] != second.headers["mcp-session-id"]
    running = pids(app, "fs")
    assert len(set(running)) == 2 and all(alive(p) for p in running)
    # Past the cap (2 in this app): a clear 503 with Retry-After, in keyplane's error shape.
    third = await initialize(http, "fs", token)
    assert_error(third, 503, "too_many_sessions")
    assert int(third.headers["retry-after"]) >= 1
    # DELETE ends a session and its process; a slot is free again.
    session_id = first.headers["mcp-session-id"]
    gone = await http.delete("/mcp/fs", headers={**bearer(token), "Mcp-Session-Id": session_id})
    assert gone.status_code == 200
    await until(lambda: len(pids(app, "fs")) == 1)
    await until(lambda: not alive(running[0]) or not alive(running[1]))
    after = await http.post("/mcp/fs", headers={**ACCEPT, **bearer(token), "Mcp-Session-Id": session_id},
                            json=rpc("tools/list"))
    assert after.status_code == 404  # the client starts afresh, as Streamable HTTP says
    assert (await initialize(http, "fs", token)).status_code == 200
    full = (await http.get("/api/v1/mcp-servers/fs/health", headers=admin)).json()["health"]
    assert full["reachable"] is True and full["process"]["live_sessions"] == 2 and "note" in full
    await http.delete("/mcp/fs", headers={**bearer(token), "Mcp-Session-Id": second.headers["mcp-session-id"]})
    health = (await http.get("/api/v1/mcp-servers/fs/health", headers=admin)).json()["health"]
    assert health["reachable"] is True and "read_text_file" in health["tools"]
    assert health["process"]["processes_started"] == 4 and health["process"]["live_sessions"] == 1


SLOW_STARTER = """
import json, sys, time
request = json.loads(sys.stdin.readline())
time.sleep(1.0)
print(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "slow", "version": "1"}}}), flush=True)
sys.stdin.read()
"""


async def test_a_starting_session_holds_exactly_one_slot(kp: Any) -> None:
    """While a process starts it holds one slot, not two: with a cap of 2, a second client starting at the
    same moment is served (the old count held the starting session in both tallies and refused it)."""
    app, http, admin, _ = kp
    server = await register(http, admin, "slow", [sys.executable, "-c", SLOW_STARTER])
    _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"slow": ["*"]})
    first = asyncio.ensure_future(initialize(http, "slow", token))
    await until(lambda: len(pids(app, "slow")) == 1)
    assert app.mcp_upstream.stdio.live(server["id"]) == 1
    second = await initialize(http, "slow", token)
    assert second.status_code == 200, second.text
    assert (await first).status_code == 200
    assert app.mcp_upstream.stdio.live(server["id"]) == 2


async def test_a_session_idles_from_its_first_answer_not_from_its_spawn(kp: Any) -> None:
    """A server slower to start than the idle timeout must not be stopped right after answering initialize
    (the idle clock used to start at the spawn, so the sweeper took the session before its first request)."""
    app, http, admin, _ = kp
    await register(http, admin, "slow", [sys.executable, "-c", SLOW_STARTER])
    _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"slow": ["*"]})
    asked_at = time.monotonic()
    opened = await initialize(http, "slow", token)
    assert opened.status_code == 200, opened.text
    [session] = [s for s in app.mcp_upstream.stdio.sessions.values() if s.route.name == "slow"]
    assert session.last_used - asked_at >= 1.0  # SLOW_STARTER answers 1 s after it reads initialize


SLOW_TOOL = """
import json, sys, time
for line in sys.stdin:
    request = json.loads(line)
    if "id" not in request:
        continue
    method, result = request["method"], {}
    if method == "initialize":
        result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                  "serverInfo": {"name": "slow-tool", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "slow", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        time.sleep(3)
        result = {"content": [{"type": "text", "text": "done"}]}
    print(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}), flush=True)
"""


async def test_a_call_longer_than_the_idle_timeout_leaves_its_session_alive(settings_factory: Any) -> None:
    """A session idles from its last answer: a call that outlasts the idle timeout is not followed by the
    session being stopped under the client (the old clock ran from the call's start)."""
    app = KeyplaneApp(settings_factory(mcp_stdio_commands=sys.executable, mcp_stdio_idle_seconds=1.5,
                                       mcp_stdio_start_seconds=20))
    await app.startup()
    try:
        assert app.bootstrap is not None and app.bootstrap.admin_token
        admin = bearer(app.bootstrap.admin_token)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "slow", [sys.executable, "-c", SLOW_TOOL])
            _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"slow": ["*"]})
            opened = await initialize(http, "slow", token)
            assert opened.status_code == 200, opened.text
            headers = {**ACCEPT, **bearer(token), "Mcp-Session-Id": opened.headers["mcp-session-id"]}
            called = await http.post("/mcp/slow", headers=headers,
                                     json=rpc("tools/call", {"name": "slow", "arguments": {}}, 5))
            assert called.status_code == 200 and "done" in called.text
            await asyncio.sleep(0.8)  # > two sweeps (every 0.375 s), < the idle timeout since the answer
            listed = await http.post("/mcp/slow", headers=headers, json=rpc("tools/list", id_=6))
            assert listed.status_code == 200, listed.text
    finally:
        await app.shutdown()


async def test_idle_sessions_are_stopped(settings_factory: Any, tmp_path: Path, caplog: Any) -> None:
    app = KeyplaneApp(settings_factory(mcp_stdio_commands="node", mcp_stdio_idle_seconds=0.4))
    await app.startup()
    try:
        assert app.bootstrap is not None and app.bootstrap.admin_token
        admin = bearer(app.bootstrap.admin_token)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(tmp_path)])
            _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"fs": ["*"]})
            with caplog.at_level(logging.INFO, logger="keyplane"):
                opened = await initialize(http, "fs", token)
            assert opened.status_code == 200
            # From the log, not from the live sessions: on a loaded machine it may idle out before we look.
            [pid] = [r.args[1] for r in caplog.records if r.getMessage().startswith("mcp stdio server 'fs' started")]
            await until(lambda: not pids(app, "fs") and not alive(pid), 10)
            late = await http.post("/mcp/fs", headers={**ACCEPT, **bearer(token),
                                                       "Mcp-Session-Id": opened.headers["mcp-session-id"]},
                                   json=rpc("tools/list"))
            assert late.status_code == 404
    finally:
        await app.shutdown()


async def test_a_server_that_crashes_mid_call_is_an_error_not_a_hang(kp: Any) -> None:
    app, http, admin, _ = kp
    await register(http, admin, "everything", [NODE, str(EVERYTHING), "stdio"])
    _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"everything": ["*"]})
    opened = await initialize(http, "everything", token)
    assert opened.status_code == 200, opened.text
    headers = {**ACCEPT, **bearer(token), "Mcp-Session-Id": opened.headers["mcp-session-id"]}
    await http.post("/mcp/everything", headers=headers, json=rpc("notifications/initialized", id_=None))
    [pid] = pids(app, "everything")
    [live] = [s for s in app.mcp_upstream.stdio.sessions.values() if s.route.name == "everything"]
    call = asyncio.ensure_future(http.post("/mcp/everything", headers=headers, json=rpc("tools/call", {
        "name": "trigger-long-running-operation", "arguments": {"duration": 20, "steps": 2}}, 7)))
    await until(lambda: b"7" in live.pending)  # the call is written to the process and waits for its answer
    os.kill(pid, signal.SIGKILL)
    resp = await asyncio.wait_for(call, 30)
    err = assert_error(resp, 502, "upstream_error")
    assert "exited" in err["message"]
    await until(lambda: not pids(app, "everything") and not alive(pid))
    # Killed once its answer has begun (progress streamed first): the stream ends with a JSON-RPC error.
    opened = await initialize(http, "everything", token)
    headers["Mcp-Session-Id"] = opened.headers["mcp-session-id"]
    [pid] = pids(app, "everything")
    async with http.stream("POST", "/mcp/everything", headers=headers, json=rpc("tools/call", {
            "name": "trigger-long-running-operation", "arguments": {"duration": 30, "steps": 100},
            "_meta": {"progressToken": "p1"}}, 8)) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        lines = streamed.aiter_lines()
        async for line in lines:
            if '"progressToken":"p1"' in line:
                break
        os.kill(pid, signal.SIGKILL)
        rest = [line async for line in lines]
    last = [line for line in rest if line.startswith("data:")][-1]
    assert '"id":8' in last and '"error"' in last and "exited before answering" in last
    await until(lambda: not pids(app, "everything") and not alive(pid))
    health = (await http.get("/api/v1/mcp-servers/everything/health", headers=admin)).json()["health"]
    assert health["process"]["processes_crashed"] == 2 and "exit" in health["process"]["last_error"]
    assert health["reachable"] is True  # the next session gets a fresh process


async def test_a_server_that_never_starts_or_exits_at_once(settings_factory: Any, caplog: Any) -> None:
    # "mute" waits out the whole start timeout; "broken" must exit within it (Python starts slowly under load).
    app = KeyplaneApp(settings_factory(mcp_stdio_commands=sys.executable, mcp_stdio_start_seconds=3))
    await app.startup()
    try:
        assert app.bootstrap is not None and app.bootstrap.admin_token
        admin = bearer(app.bootstrap.admin_token)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            await register(http, admin, "mute", [sys.executable, "-c", "import time; time.sleep(60)"])
            await register(http, admin, "broken", [sys.executable, "-c", (
                "import os, sys; sys.stderr.write('cannot start: token ' + os.environ['API_TOKEN'] + '\\n'); "
                "sys.exit(3)")], env={"API_TOKEN": ENV_SECRET})
            _, token = await create_key(http, admin, scopes=["tools:call"],
                                        mcp_servers={"mute": ["*"], "broken": ["*"]})
            with caplog.at_level(logging.INFO, logger="keyplane"):
                mute = await initialize(http, "mute", token)
                assert_error(mute, 504, "upstream_timeout")
                assert not pids(app, "mute")
                broken = await initialize(http, "broken", token)
                err = assert_error(broken, 502, "upstream_error")
                assert "exit code 3" in err["message"] and "cannot start: token" in err["message"]
                health = (await http.get("/api/v1/mcp-servers/broken/health", headers=admin)).json()["health"]
            assert health["reachable"] is False and health["process"]["processes_crashed"] >= 1
            # The env secret was on the process's stderr: masked in the answer, the health report and the log.
            ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("keyplane"))
            assert "cannot start: token" in ours
            for text in (broken.text, str(health), ours):
                assert ENV_SECRET not in text
    finally:
        await app.shutdown()


async def test_env_is_write_only_masked_and_keyplane_environment_is_not_inherited(
        kp: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    _, http, admin, base = kp
    monkeypatch.setenv("KEYPLANE_PROBE_NOT_FOR_CHILDREN", "keyplane-own-value")
    server = await register(http, admin, "everything", [NODE, str(EVERYTHING), "stdio"],
                            env={"UPSTREAM_TOKEN": ENV_SECRET})
    assert server["env"] == ["UPSTREAM_TOKEN"]
    listed = await http.get("/api/v1/mcp-servers", headers=admin)
    audit = await http.get("/api/v1/audit", headers=admin)
    _, token = await create_key(http, admin, scopes=["tools:call"], mcp_servers={"everything": ["*"]})
    with caplog.at_level(logging.DEBUG):
        async with session(f"{base}/mcp/everything", token) as mcp:
            shown = (await mcp.call_tool("get-env", {})).content[0].text
            echoed = (await mcp.call_tool("echo", {"message": f"say {ENV_SECRET}"})).content[0].text
    assert "UPSTREAM_TOKEN" in shown  # the variable is there: the server got it
    assert "KEYPLANE_PROBE_NOT_FOR_CHILDREN" not in shown  # keyplane's own environment is not passed on
    # The dashboard shows what runs and the env names, never a value; health shows the processes.
    assert (await http.post("/ui/login", data={"token": admin["Authorization"].removeprefix("Bearer ")})
            ).status_code == 303
    page = await http.get("/ui/mcp-servers")
    assert "runs" in page.text and "server-everything" in page.text and "UPSTREAM_TOKEN" in page.text
    checked = await http.get("/ui/mcp-servers/everything/health")
    assert "Reachable" in checked.text and "Processes:" in checked.text
    assert "…" in shown and "say …" in echoed  # whatever the server writes to stdout is masked on its way out
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("keyplane"))
    assert "mcp stdio server 'everything'" in ours
    for text in (shown, echoed, listed.text, audit.text, str(server), ours, page.text, checked.text):
        assert ENV_SECRET not in text


async def test_commands_need_the_allow_list_and_manage_scope(kp: Any, tmp_path: Path) -> None:
    _, http, admin, base = kp
    resp = await http.post("/api/v1/mcp-servers", json={"name": "sh", "command": ["/bin/sh", "-c", "id"]},
                           headers=admin)
    assert_error(resp, 403, "command_not_allowed")
    both = await http.post("/api/v1/mcp-servers", json={"name": "x", "command": [NODE], "url": "http://a/mcp"},
                           headers=admin)
    assert both.status_code == 422
    _, reader = await create_sa(http, admin, ["virtual_keys:read"])
    refused = await http.post("/api/v1/mcp-servers", json={"name": "n", "command": [NODE]}, headers=bearer(reader))
    assert refused.status_code == 403
    await register(http, admin, "fs", [NODE, str(FILESYSTEM), str(tmp_path)])
    swap = await http.patch("/api/v1/mcp-servers/fs", json={"command": ["/bin/sh"]}, headers=admin)
    assert_error(swap, 403, "command_not_allowed")
    # Agents over MCP cannot pass a command (nor env): the management tool takes a url only.
    async with session(f"{base}/mcp", admin["Authorization"].removeprefix("Bearer ")) as mcp:
        [tool] = [t for t in (await mcp.list_tools()).tools if t.name == "keyplane_register_mcp_server"]
    assert "url" in tool.input_schema["properties"]
    assert not {"command", "env", "cwd"} & set(tool.input_schema["properties"])


def test_cli_registers_a_command_with_env_from_the_environment(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import orjson
    from typer.testing import CliRunner

    from keyplane.cli import app as cli_app

    for name in [n for n in os.environ if n.startswith("KEYPLANE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KEYPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEYPLANE_MCP_STDIO_COMMANDS", "node")
    monkeypatch.setenv("FS_TOKEN_SOURCE", ENV_SECRET)
    runner = CliRunner()

    def ok(*args: str) -> str:
        result = runner.invoke(cli_app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    ok("orgs", "create", "default")
    out = ok("mcp-servers", "add", "fs", "--command", f"node '{FILESYSTEM}' '{tmp_path}'",
             "--env-from", "FS_TOKEN=FS_TOKEN_SOURCE", "--cwd", str(tmp_path), "--no-key")
    assert ENV_SECRET not in out
    shown = orjson.loads(ok("mcp-servers", "show", "fs"))
    assert shown["command"] == ["node", str(FILESYSTEM), str(tmp_path)] and shown["env"] == ["FS_TOKEN"]
    assert shown["cwd"] == str(tmp_path) and shown["transport"] == "stdio"
    health = ok("mcp-servers", "health", "fs")
    assert "reachable" in health and "read_text_file" in health
    refused = runner.invoke(cli_app, ["mcp-servers", "update", "fs", "--command", "sh -c id"])
    assert refused.exit_code == 1 and "command_not_allowed" in refused.output
    ok("mcp-servers", "update", "fs", "--clear-env")
    assert orjson.loads(ok("mcp-servers", "show", "fs"))["env"] == []


async def test_a_write_to_a_server_that_already_exited_says_why() -> None:
    # A server that exits at once can be gone before keyplane writes `initialize` (a broken pipe) or after
    # (its stdout ends): either way the client must hear the exit code and the server's stderr, not only
    # "closed its input". Deterministic: a pipe that is already broken, and readers that record the exit
    # a moment later, as _read_stdout and _read_stderr do.
    from types import SimpleNamespace

    from keyplane.domain.errors import KeyplaneError
    from keyplane.gateway.mcp_stdio import StdioSession

    class BrokenStdin:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            raise BrokenPipeError

    session = StdioSession("s", SimpleNamespace(name="broken"), SimpleNamespace(stdin=BrokenStdin()))  # type: ignore[arg-type]

    async def readers_see_the_exit() -> None:
        await asyncio.sleep(0.05)
        session.stderr_tail.append("cannot start: token …")
        session.ended = "exited (exit code 3)"

    session.tasks = [asyncio.ensure_future(readers_see_the_exit())]
    with pytest.raises(KeyplaneError) as refused:
        await session.send(b'{"jsonrpc":"2.0","id":1,"method":"initialize"}')
    assert refused.value.status == 502 and refused.value.code == "upstream_error"
    assert "exit code 3" in refused.value.message and "cannot start: token" in refused.value.message
