"""A real ``keyplane serve`` running stdio MCP servers: killed with SIGKILL, it leaves no process behind
(the servers' own children included: the command here starts `server-everything` as a grandchild, as
``npx`` and ``uvx`` do); stopped with SIGTERM, it stops them itself."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from keyplane.domain import tokens
from tests.processes import Server
from tests.test_mcp_stdio import EVERYTHING, alive

ADMIN = tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)
# The server's process runs node as its child, and a helper that ignores the end of its input (as a server's
# language server or browser may): keyplane's child (python) and grandchildren (node, the helper) must all go.
WRAPPER = [sys.executable, "-c", (
    "import subprocess, sys; "
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "time.sleep(600)'], stdin=subprocess.DEVNULL); "
    f"sys.exit(subprocess.call(['node', {str(EVERYTHING)!r}, 'stdio']))")]


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return {pid for pid in found if alive(pid)}


def wait_for(condition: object, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def open_sessions(server: Server, count: int) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        if http.get("/api/v1/mcp-servers/everything", headers=admin).status_code == 404:
            made = http.post("/api/v1/mcp-servers", json={"name": "everything", "command": WRAPPER,
                                                          "env": {"EV_TOKEN": "process-env-secret-91"}},
                             headers=admin)
            assert made.status_code == 201, made.text
        key = http.post("/api/v1/keys", json={"name": "k", "scopes": ["tools:call"],
                                              "mcp_servers": {"everything": ["*"]}}, headers=admin)
        assert key.status_code == 201, key.text
        headers = {"Authorization": f"Bearer {key.json()['secret']}", "Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream"}
        for _ in range(count):
            resp = http.post("/mcp/everything", headers=headers, json={
                "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sigkill_of_keyplane_leaves_no_stdio_server_behind(store_env: dict[str, str], tmp_path: Path) -> None:
    env = {**store_env, "KEYPLANE_ADMIN_TOKEN": ADMIN, "KEYPLANE_MCP_STDIO_COMMANDS": sys.executable}
    server = Server(env, tmp_path)
    try:
        server.wait_ready(timeout=60)
        open_sessions(server, 2)
        children = descendants(server.proc.pid)
        assert len(children) >= 6, children  # two sessions: python, node, helper each (and the watchman)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        assert wait_for(lambda: not any(alive(pid) for pid in children)), \
            [pid for pid in children if alive(pid)]
    finally:
        server.stop()
    assert "process-env-secret-91" not in server.logs + server.output

    # A restarted keyplane has nothing to reap and serves the server again; SIGTERM stops its processes.
    again = Server(env, tmp_path)
    try:
        again.wait_ready(timeout=60)
        open_sessions(again, 1)
        children = descendants(again.proc.pid)
        assert len(children) >= 3, children
    finally:
        assert again.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a graceful shutdown
    assert wait_for(lambda: not any(alive(pid) for pid in children)), [pid for pid in children if alive(pid)]
    assert "stopped: keyplane is stopping" in again.logs  # by keyplane itself, not by the watchman
    assert "process-env-secret-91" not in again.logs + again.output
