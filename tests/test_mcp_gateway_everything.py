"""The MCP gateway in front of a server no one here wrote: `@modelcontextprotocol/server-everything` (npm) in its
Streamable HTTP mode, driven by the official TypeScript SDK client and the Python SDK client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keyplane.app import KeyplaneApp
from tests.conftest import create_key
from tests.processes import free_port, serve
from tests.test_mcp_gateway import session

CLIENT_DIR = Path(__file__).parent / "mcp_ts_client"
NODE = shutil.which("node")
EVERYTHING = CLIENT_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
GRANT = ["echo", "get-sum", "get-tiny-image", "trigger-long-*"]


def test_server_everything_is_installed() -> None:
    """`npm ci --prefix tests/mcp_ts_client` installs it (make test does); CI must not silently skip it."""
    assert NODE and EVERYTHING.is_file(), "run `npm ci --prefix tests/mcp_ts_client`"


@pytest.fixture(scope="module")
def everything() -> Iterator[str]:
    if not NODE or not EVERYTHING.is_file():
        pytest.skip("server-everything not installed")
    port = free_port()
    proc = subprocess.Popen([NODE, str(EVERYTHING), "streamableHttp"], env={**os.environ, "PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("server-everything did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_typescript_and_python_clients_through_the_gateway(
        app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], everything: str) -> None:
    resp = await client.post("/api/v1/mcp-servers", json={"name": "everything", "url": everything,
                                                           "headers": {"X-Upstream-Token": "ev-secret-123456"}},
                             headers=admin)
    assert resp.status_code == 201, resp.text
    _, token = await create_key(client, admin, scopes=["tools:call", "prompts:read"],
                                mcp_servers={"everything": GRANT})
    async with serve(app) as base:
        url = f"{base}/mcp/everything"
        proc = await asyncio.create_subprocess_exec(
            NODE or "node", str(CLIENT_DIR / "gateway_client.mjs"), url, token,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=90)
        assert proc.returncode == 0, stderr.decode()
        seen = json.loads(stdout)
        assert seen["sessionId"]
        # Only the granted tools are listed (get-env, the sampling and elicitation triggers are not).
        assert seen["tools"] == sorted(["echo", "get-sum", "get-tiny-image", "trigger-long-running-operation"])
        assert seen["echo"] == "Echo: hi"
        assert "5" in seen["sum"]
        assert "403" in seen["env"]["error"] or "tool_not_allowed" in seen["env"]["error"]
        assert "403" in seen["resources"]["error"] or "contexts:read" in seen["resources"]["error"]
        assert isinstance(seen["prompts"], list) and seen["prompts"]
        assert "Long running operation completed" in seen["long"]
        assert seen["progress"] == [1, 2, 3]

        async with session(url, token) as mcp:
            names = {t.name for t in (await mcp.list_tools()).tools}
            assert names == {"echo", "get-sum", "get-tiny-image", "trigger-long-running-operation"}
            assert (await mcp.call_tool("echo", {"message": "py"})).content[0].text == "Echo: py"

    await app.kp.flush_usage()
    events = (await client.get("/api/v1/usage/events", params={"limit": 200}, headers=admin)).json()["data"]
    tools = {e["tool"] for e in events if e["mcp_method"] == "tools/call"}
    assert {"echo", "get-sum", "get-env", "trigger-long-running-operation"} <= tools
    refused = [e for e in events if e["tool"] == "get-env"]
    assert refused and all(e["status"] == 403 and e["code"] == "tool_not_allowed" for e in refused)
