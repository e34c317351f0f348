"""Upstream HTTP clients side by side: the same POST to the same local upstream, same run.

    python bench/upstream_clients.py                       # every client, 3 interleaved rounds of 5 s
    python bench/upstream_clients.py --clients lean,aiohttp --seconds 3 --concurrency 64

Each client runs in its own process on uvloop (as keyplane does), pinned to core 0; the upstream
(bench/fake_upstream.py under uvicorn) is pinned to core 1. ``--concurrency`` tasks send the gateway's
request (a Chat Completions POST, JSON body, bearer header) in a loop and read the whole answer. Reported:
requests per second and CPU µs per request of the client process (user + system time / requests):
the second is what the gateway pays per forwarded request. Clients that are not installed are skipped.

    aiohttp     what keyplane used before issue 19
    pyreqwest   Rust (reqwest/hyper) bindings         pip install pyreqwest
    aiosonic    pure-Python asyncio client             pip install aiosonic
    httpr       Rust (reqwest) bindings, httpx-like    pip install httpr
    lean        keyplane/gateway/http_client.py (asyncio protocols + httptools)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"hello"}]}'
HEADERS = {"content-type": "application/json", "accept": "application/json",
           "authorization": "Bearer sk-bench-upstream"}
CLIENTS = ("aiohttp", "pyreqwest", "aiosonic", "httpr", "lean")

Send = Callable[[], Awaitable[int]]


async def make(name: str, url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """A function that sends one request and returns the answer's length, and one that closes the client."""
    if name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200), trust_env=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)

        async def send() -> int:
            async with session.request("POST", url, data=BODY, headers=HEADERS, timeout=timeout) as resp:
                assert resp.status == 200
                return len(await resp.read())

        return send, session.close
    if name == "pyreqwest":
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder

        client = ClientBuilder().max_connections(200).build()
        read = timedelta(seconds=30)

        async def send() -> int:
            resp = await client.post(url).headers(HEADERS).body_bytes(BODY).timeout(read).build().send()
            assert resp.status == 200
            return len(await resp.bytes())

        return send, client.close
    if name == "aiosonic":
        import aiosonic

        client = aiosonic.HTTPClient()  # default pool per host

        async def send() -> int:
            resp = await client.post(url, data=BODY, headers=HEADERS)
            assert resp.status_code == 200
            return len(await resp.content())

        async def close() -> None:
            await client.connector.cleanup()

        return send, close
    if name == "httpr":
        import httpr

        client = httpr.AsyncClient(timeout=30)

        async def send() -> int:
            resp = await client.post(url, content=BODY, headers=HEADERS)
            assert resp.status_code == 200
            return len(resp.content)

        async def close() -> None:
            await client.aclose() if hasattr(client, "aclose") else None

        return send, close
    if name == "lean":
        from keyplane.gateway.http_client import HttpClient

        lean = HttpClient(max_connections=200)

        async def send() -> int:
            resp = await lean.request("POST", url, HEADERS, BODY, connect_timeout=30, read_timeout=30)
            assert resp.status == 200
            return len(await resp.read())

        return send, lean.close
    raise SystemExit(f"unknown client {name}")


async def run(name: str, url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    send, close = await make(name, url, concurrency)
    size = await send()  # warm: one pooled connection, imports done
    assert size > 100, size
    count = 0
    errors = 0
    stop = time.perf_counter() + 1.0  # warm-up second at full concurrency, not counted

    async def worker() -> None:
        nonlocal count, errors
        while time.perf_counter() < stop:
            try:
                await send()
                count += 1
            except Exception:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    count = errors = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stop = wall0 + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await close()
    return {"rps": round(count / wall, 1), "cpu_us_per_request": round(cpu / max(count, 1) * 1e6, 1),
            "errors": errors}


def child(args: argparse.Namespace) -> None:
    import uvloop

    print(json.dumps(uvloop.run(run(args.child, args.url, args.seconds, args.concurrency))))


def installed(name: str) -> bool:
    try:
        __import__({"lean": "httptools"}.get(name, name))
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from bench.hotpath import free_port

    names = [n for n in args.clients.split(",") if installed(n)]
    skipped = [n for n in args.clients.split(",") if n not in names]
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    upstream = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "uvicorn", "bench.fake_upstream:app", "--port", str(port),
         "--no-access-log", "--log-level", "warning", "--http", "httptools", "--loop", "uvloop"],
        cwd=ROOT, start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(url, content=BODY, headers=HEADERS)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for round_no in range(args.rounds):
            for name in (names if round_no % 2 == 0 else list(reversed(names))):  # order alone shows in figures
                out = subprocess.run(
                    ["taskset", "-c", "0", sys.executable, __file__, "--child", name, "--url", url,
                     "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)],
                    cwd=ROOT, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(f"{name} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                samples[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        upstream.terminate()
        upstream.wait()
    report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                              "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                              "seconds": args.seconds, "rounds": args.rounds, "concurrency": args.concurrency,
                              "skipped_not_installed": skipped, "clients": {}}
    for name, xs in samples.items():
        if xs:
            report["clients"][name] = {m: statistics.median(x[m] for x in xs)
                                       for m in ("rps", "cpu_us_per_request", "errors")}
    base = report["clients"].get("aiohttp")
    if base:
        for figures in report["clients"].values():
            figures["rps_vs_aiohttp"] = round(figures["rps"] / base["rps"], 2)
            figures["cpu_vs_aiohttp"] = round(figures["cpu_us_per_request"] / base["cpu_us_per_request"], 2)
    print(json.dumps(report, indent=2))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "upstream_clients.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
