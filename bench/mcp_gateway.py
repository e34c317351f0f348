"""MCP gateway benchmark: tools/call on the same upstream MCP server, directly and through keyplane, same run.

    python bench/mcp_gateway.py                 # ~1.5 minutes
    python bench/mcp_gateway.py --seconds 5 --rounds 1
    python bench/mcp_gateway.py --in-process     # the gateway's own cost per call, no sockets, ~10 s

Reports the latency keyplane adds at 1 connection (p50, p99) and the throughput ratio at 64 connections.
The upstream is an MCP server built with the official Python SDK (bench/mcp_upstream_app.py: stateless,
JSON answers, one `echo` tool). keyplane (uvicorn, one worker) is pinned to core 0; the upstream and wrk
share core 1 in both measurements. Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.hotpath as hp  # noqa: E402
from bench.gateway import Pinned, uvicorn_cmd  # noqa: E402
from bench.hotpath import free_port, lua_post, wrk  # noqa: E402
from keyplane.config import Settings  # noqa: E402
from keyplane.services.container import Keyplane  # noqa: E402
from keyplane.services.principal import system  # noqa: E402
from keyplane.services.schemas import KeyCreate, LimitProfileCreate, McpServerCreate  # noqa: E402

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}


async def seed(home: Path, upstream_url: str) -> str:
    kp = Keyplane(Settings(home=home))
    await kp.migrate()
    boot = await kp.bootstrap()
    who = system(boot.org_id)
    await kp.limit_profiles.create(who, LimitProfileCreate(name="bench", requests_per_minute=10_000_000))
    await kp.mcp_servers.create(who, McpServerCreate(name="bench", url=upstream_url, default_key=False,
                                                     headers={"Authorization": "Bearer upstream-bench-secret"}))
    _, key = await kp.keys.create(who, KeyCreate(name="bench", limit_profile="bench", scopes=["tools:call"],
                                                 mcp_servers={"bench": ["*"]}))
    await kp.db.dispose()
    return key


class _Answer:
    """A finished JSON answer, for measuring the gateway without an upstream."""

    def __init__(self) -> None:
        self.status = 200
        self.headers = {"content-type": "application/json"}

    body = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}],"isError":false}}'

    async def read(self, limit: int) -> bytes:
        return self.body

    def chunks(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Instant:
    async def open(self, route: Any, method: str, headers: dict[str, str], body: bytes) -> _Answer:
        return _Answer()

    async def close(self) -> None:
        pass


async def in_process(n: int) -> dict[str, float]:
    """µs per request, in this process with no sockets: a tools/call through /mcp/{name} (upstream answers at
    once) next to an enforced GET /v1/models (the same enforcement, no forwarding), interleaved."""
    import time

    from keyplane.app import KeyplaneApp

    with tempfile.TemporaryDirectory() as tmp:
        app = KeyplaneApp(Settings(home=Path(tmp), access_log=False))
        boot = await app.startup()
        try:
            who = system(boot.org_id)
            await app.kp.limit_profiles.create(who, LimitProfileCreate(name="bench", requests_per_minute=10_000_000))
            await app.kp.mcp_servers.create(who, McpServerCreate(name="bench", url="http://127.0.0.1:9/mcp",
                                                                 default_key=False))
            _, key = await app.kp.keys.create(who, KeyCreate(
                name="bench", limit_profile="bench", scopes=["tools:call", "models:read"],
                mcp_servers={"bench": ["*"]}))
            app.mcp_gateway.upstream = _Instant()
            body = json.dumps(CALL).encode()
            auth = (b"authorization", f"Bearer {key}".encode())
            calls = {
                "mcp_tools_call": ({"type": "http", "method": "POST", "path": "/mcp/bench", "query_string": b"",
                                    "client": ("127.0.0.1", 1), "headers": [
                                        auth, (b"content-type", b"application/json"),
                                        (b"accept", b"application/json, text/event-stream"),
                                        (b"content-length", str(len(body)).encode())]}, body),
                "v1_models": ({"type": "http", "method": "GET", "path": "/v1/models", "query_string": b"",
                               "client": ("127.0.0.1", 1), "headers": [auth]}, b""),
            }
            statuses: list[int] = []

            async def send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            async def once(scope: dict[str, Any], payload: bytes) -> None:
                given = False

                async def receive() -> dict[str, Any]:
                    nonlocal given
                    if not given:
                        given = True
                        return {"type": "http.request", "body": payload, "more_body": False}
                    await asyncio.sleep(3600)  # the client stays
                    return {"type": "http.disconnect"}

                await app(scope, receive, send)

            # Wall time, and this thread's CPU time: on a loaded machine the second leaves out the time other
            # processes held the core, so it is the steadier figure (the event loop runs in this thread).
            results: dict[str, list[float]] = {name: [] for name in calls}
            cpu: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(5):
                for name, (scope, payload) in calls.items():
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    for _ in range(n):
                        await once(scope, payload)
                    results[name].append((time.perf_counter() - start) / n * 1e6)
                    cpu[name].append((time.thread_time() - start_cpu) / n * 1e6)
            assert set(statuses) == {200}, set(statuses)
            report = {f"{name}_us": round(statistics.median(xs), 1) for name, xs in results.items()}
            report.update({f"{name}_cpu_us": round(statistics.median(xs), 1) for name, xs in cpu.items()})
            report["ratio_cpu"] = round(report["mcp_tools_call_cpu_us"] / report["v1_models_cpu_us"], 2)
            return report
        finally:
            await app.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-process", action="store_true", help="only the gateway's own cost per call")
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(asyncio.run(in_process(2000)), indent=2))
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, kp_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}/mcp"
        key = asyncio.run(seed(work / "home", upstream_url))
        env = {**os.environ, "KEYPLANE_HOME": str(work / "home")}
        upstream = Pinned("1", uvicorn_cmd("bench.mcp_upstream_app:app", up_port), env, work / "up.log")
        keyplane = Pinned("0", uvicorn_cmd("keyplane.asgi:app", kp_port), env, work / "kp.log")
        try:
            upstream.wait(f"http://127.0.0.1:{up_port}/")  # (a GET on /mcp would open an event stream)
            keyplane.wait(f"http://127.0.0.1:{kp_port}/healthz")
            script = lua_post(work / "call.lua", CALL)
            targets = {"direct": upstream_url, "keyplane": f"http://127.0.0.1:{kp_port}/mcp/bench"}
            headers = {"direct": {**MCP_HEADERS, "Authorization": "Bearer upstream-bench-secret"},
                       "keyplane": {**MCP_HEADERS, "Authorization": f"Bearer {key}"}}
            report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                                      "seconds": args.seconds, "rounds": args.rounds}
            for label, connections in (("single_c1", 1), ("high_c64", 64)):
                hp.CONNECTIONS = connections
                samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for name in targets:
                    wrk(targets[name], 2, headers[name], script)
                for _ in range(args.rounds):
                    for name in targets:  # interleaved, so both see the same machine load
                        sample = wrk(targets[name], args.seconds, headers[name], script)
                        assert sample["non_2xx"] == 0, (name, sample)
                        samples[name].append(sample)
                report[label] = {name: {m: statistics.median(s[m] for s in xs) for m in ("rps", "p50_ms", "p99_ms")}
                                 for name, xs in samples.items()}
        finally:
            keyplane.stop()
            upstream.stop()
    one, high = report["single_c1"], report["high_c64"]
    report["added_p50_ms_c1"] = round(one["keyplane"]["p50_ms"] - one["direct"]["p50_ms"], 3)
    report["added_p99_ms_c1"] = round(one["keyplane"]["p99_ms"] - one["direct"]["p99_ms"], 3)
    report["throughput_ratio_c64"] = round(high["keyplane"]["rps"] / high["direct"]["rps"], 3)
    print(json.dumps(report, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "mcp_gateway.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
