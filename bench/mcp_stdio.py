"""stdio MCP server benchmark: the same stdio server driven directly by the SDK's stdio client and through
keyplane (`/mcp/{name}`, one process per session), same run.

    python bench/mcp_stdio.py                    # ~1 minute
    python bench/mcp_stdio.py --sessions 5 --calls 200 --memory-sessions 8

Reports, for `@modelcontextprotocol/server-everything` in stdio mode (installed by
`npm ci --prefix tests/mcp_ts_client`):
- session start: from nothing to the first `initialize` answered (direct: the SDK spawns the process and
  initializes; through keyplane: an HTTP `initialize`, for which keyplane spawns the process);
- a `tools/call` (`echo`) round trip in an open session, p50 and p99 (also through keyplane with a minimal
  raw HTTP client, to separate the SDK HTTP client's own cost from keyplane's);
- the stateless 2026-07-28 protocol through keyplane (raw HTTP, no session: keyplane's own pool process
  answers; "start" is the first request, which starts that process);
- memory per live session through keyplane: RSS of the server processes plus keyplane's own growth,
  divided by the number of sessions.
keyplane runs as a real `keyplane serve` (one worker) on loopback; the Python SDK client is the caller in
both cases, so the difference is what keyplane adds (HTTP, enforcement, the stdio bridge).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import httpx2  # noqa: E402
from mcp.client import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from bench.hotpath import free_port  # noqa: E402
from keyplane.config import Settings  # noqa: E402
from keyplane.services.container import Keyplane  # noqa: E402
from keyplane.services.principal import system  # noqa: E402
from keyplane.services.schemas import KeyCreate, LimitProfileCreate, McpServerCreate  # noqa: E402

EVERYTHING = ROOT / "tests" / "mcp_ts_client" / "node_modules" / "@modelcontextprotocol" / "server-everything" / \
    "dist" / "index.js"
COMMAND = ["node", str(EVERYTHING), "stdio"]


async def seed(home: Path, sessions: int) -> str:
    kp = Keyplane(Settings(home=home, mcp_stdio_commands="node"))
    await kp.migrate()
    boot = await kp.bootstrap()
    who = system(boot.org_id)
    await kp.limit_profiles.create(who, LimitProfileCreate(name="bench", requests_per_minute=10_000_000))
    await kp.mcp_servers.create(who, McpServerCreate(name="everything", command=COMMAND, default_key=False))
    _, key = await kp.keys.create(who, KeyCreate(name="bench", limit_profile="bench", scopes=["tools:call"],
                                                 mcp_servers={"everything": ["*"]}))
    await kp.db.dispose()
    return key


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(open_client: Callable[[], Any], sessions: int, calls: int) -> dict[str, float]:
    starts: list[float] = []
    rounds: list[float] = []
    for _ in range(sessions):
        began = time.perf_counter()
        async with open_client() as client:
            starts.append((time.perf_counter() - began) * 1000)
            for _ in range(calls):
                t = time.perf_counter()
                result = await client.call_tool("echo", {"message": "hi"})
                rounds.append((time.perf_counter() - t) * 1000)
            assert result.content[0].text == "Echo: hi", result
    return {"start_p50_ms": statistics.median(starts), "start_max_ms": max(starts),
            "call_p50_ms": statistics.median(rounds), "call_p99_ms": pct(rounds, 0.99)}


async def raw_calls(base: str, key: str, sessions: int, calls: int) -> dict[str, float]:
    """The same through keyplane with a minimal client (one kept-alive httpx connection, JSON answers): what
    keyplane adds without the SDK's HTTP client in the way."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-06-18"}
    starts: list[float] = []
    rounds: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for _ in range(sessions):
            began = time.perf_counter()
            resp = await http.post("/mcp/everything", headers=headers, json={
                "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "b", "version": "1"}}})
            starts.append((time.perf_counter() - began) * 1000)
            session = {**headers, "Mcp-Session-Id": resp.headers["mcp-session-id"]}
            await http.post("/mcp/everything", headers=session,
                            json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            for i in range(calls):
                t = time.perf_counter()
                answer = await http.post("/mcp/everything", headers=session, json={
                    "jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"message": "hi"}}})
                rounds.append((time.perf_counter() - t) * 1000)
                assert answer.status_code == 200 and "Echo: hi" in answer.text, answer.text
            await http.delete("/mcp/everything", headers=session)
    return {"start_p50_ms": statistics.median(starts), "start_max_ms": max(starts),
            "call_p50_ms": statistics.median(rounds), "call_p99_ms": pct(rounds, 0.99)}


async def stateless_calls(base: str, key: str, calls: int) -> dict[str, float]:
    """tools/call on the stateless protocol: every request stands alone, a pool process answers."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "echo"}
    envelope = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}
    rounds: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for i in range(calls + 1):
            t = time.perf_counter()
            answer = await http.post("/mcp/everything", headers=headers, json={
                "jsonrpc": "2.0", "id": i, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"message": "hi"}, "_meta": envelope}})
            rounds.append((time.perf_counter() - t) * 1000)
            assert answer.status_code == 200 and "Echo: hi" in answer.text, answer.text
    first, rest = rounds[0], rounds[1:]
    return {"start_p50_ms": first, "start_max_ms": first, "call_p50_ms": statistics.median(rest),
            "call_p99_ms": pct(rest, 0.99)}


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "stdio_reaper" not in line]


async def memory(base: str, key: str, server_pid: int, count: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    before = rss_kib(server_pid)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for i in range(count):
            resp = await http.post("/mcp/everything", headers=headers, json={
                "jsonrpc": "2.0", "id": i, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "b", "version": "1"}}})
            assert resp.status_code == 200, resp.text
        await asyncio.sleep(1.0)
        processes = children(server_pid)
        servers = sum(rss_kib(p) + sum(rss_kib(c) for c in children(p)) for p in processes)
        grown = rss_kib(server_pid) - before
    return {"sessions": count, "server_rss_mib_per_session": servers / 1024 / count,
            "keyplane_rss_growth_kib_per_session": grown / count}


def start_keyplane(home: Path, memory_sessions: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPLANE_")}
    env.update(KEYPLANE_HOME=str(home), KEYPLANE_MCP_STDIO_COMMANDS="node", KEYPLANE_ACCESS_LOG="false",
               KEYPLANE_LOG_LEVEL="warning", KEYPLANE_MCP_STDIO_MAX_SESSIONS=str(max(16, memory_sessions + 2)))
    keyplane = Path(sys.executable).parent / "keyplane"
    server = subprocess.Popen([str(keyplane), "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    sys.exit("keyplane did not start")


async def run_all(base: str, key: str, server_pid: int, args: argparse.Namespace
                  ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    def direct() -> Any:
        return Client(stdio_client(StdioServerParameters(command="node", args=COMMAND[1:])), cache=None)

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def through() -> Any:
        # A session (its own process), as the direct side has: "auto" would find the stateless protocol.
        return Client(streamable_http_client(f"{base}/mcp/everything", http_client=http), mode="legacy",
                      cache=None)

    runs: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
        "direct (SDK stdio client)": lambda: measure(direct, args.sessions, args.calls),
        "through keyplane": lambda: measure(through, args.sessions, args.calls),
    }
    results = {name: await run() for name, run in runs.items()}
    await http.aclose()
    results["through keyplane, raw HTTP"] = await raw_calls(base, key, args.sessions, args.calls)
    results["keyplane, stateless 2026"] = await stateless_calls(base, key, args.sessions * args.calls)
    return results, await memory(base, key, server_pid, args.memory_sessions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5, help="sessions started per side (start latency)")
    parser.add_argument("--calls", type=int, default=200, help="tools/call round trips per session")
    parser.add_argument("--memory-sessions", type=int, default=8)
    args = parser.parse_args()
    if not shutil.which("node") or not EVERYTHING.is_file():
        sys.exit("run `npm ci --prefix tests/mcp_ts_client` first")

    home = Path(tempfile.mkdtemp(prefix="kp-bench-stdio-"))
    key = asyncio.run(seed(home, args.sessions))
    server, base = start_keyplane(home, args.memory_sessions)
    try:
        results, mem = asyncio.run(run_all(base, key, server.pid, args))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"server-everything (stdio), {args.sessions} sessions x {args.calls} echo calls per side; "
          f"loadavg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':28} {'start p50':>10} {'start max':>10} {'call p50':>9} {'call p99':>9}")
    for name, r in results.items():
        print(f"{name:28} {r['start_p50_ms']:>8.1f}ms {r['start_max_ms']:>8.1f}ms {r['call_p50_ms']:>7.2f}ms "
              f"{r['call_p99_ms']:>7.2f}ms")
    d, k = results["direct (SDK stdio client)"], results["through keyplane"]
    r = results["through keyplane, raw HTTP"]
    print(f"through keyplane vs direct, same SDK client: start {k['start_p50_ms'] - d['start_p50_ms']:+.1f} ms p50, "
          f"call {k['call_p50_ms'] - d['call_p50_ms']:+.2f} ms p50; with a raw HTTP client: call "
          f"{r['call_p50_ms'] - d['call_p50_ms']:+.2f} ms p50")
    st = results["keyplane, stateless 2026"]
    print(f"stateless vs session (both raw HTTP through keyplane): call {st['call_p50_ms'] / r['call_p50_ms']:.2f}x "
          "p50")
    print(f"memory, {mem['sessions']} live sessions through keyplane: {mem['server_rss_mib_per_session']:.1f} MiB "
          f"of server process per session, keyplane itself +{mem['keyplane_rss_growth_kib_per_session']:.0f} KiB "
          "per session")


if __name__ == "__main__":
    main()
