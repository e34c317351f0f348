"""Hot-path benchmark: keyplane's enforced paths against a bare Starlette endpoint, same run, same server.

    python bench/hotpath.py                # uvicorn and granian, 10 s per measurement
    python bench/hotpath.py --seconds 5 --servers uvicorn

(a) bare Starlette endpoint doing a dict lookup of a SHA-256 (the floor any key check sits on)
(b) keyplane's verify API (POST /api/v1/keys/verify)
(c) GET /v1/models with a key that has an IP allowlist, a limit profile and scopes
Then, with 100,000 keys in the store: cache-miss latency (every request a key not yet cached) and
memory per cached key. Load comes from wrk on loopback, pinned to the other core. Needs `wrk`
(Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyplane.config import Settings  # noqa: E402
from keyplane.domain import tokens  # noqa: E402
from keyplane.services.container import Keyplane  # noqa: E402
from keyplane.services.principal import system  # noqa: E402
from keyplane.services.schemas import KeyCreate, LimitProfileCreate  # noqa: E402

BIN = Path(sys.executable).parent
CONNECTIONS = 64


def server_command(server: str, target: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [str(BIN / "uvicorn"), target, "--port", str(port), "--no-access-log", "--log-level", "warning",
                "--loop", "uvloop", "--http", "httptools"]
    return [str(BIN / "granian"), "--interface", "asgi", target, "--port", str(port), "--no-access-log",
            "--log-level", "warning", "--loop", os.environ.get("BENCH_GRANIAN_LOOP", "uvloop")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server under test, pinned to ``cpus`` (None: unpinned), in a process group of its own."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cpus: str | None = "0") -> None:
        self.log = log.open("w")
        prefix = ["taskset", "-c", cpus] if cpus else []
        self.p = subprocess.Popen([*prefix, *cmd], env=env, cwd=ROOT, stdout=self.log,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, url: str) -> None:
        for _ in range(200):
            try:
                httpx.get(url, timeout=0.5)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server at {url} did not start")

    def stop(self) -> None:
        os.killpg(self.p.pid, signal.SIGTERM)
        try:
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.log.close()


def wrk(url: str, seconds: int, headers: dict[str, str], script: Path | None = None) -> dict[str, float]:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50_ms": latency("50"), "p99_ms": latency("99"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "requests": int(done.group(1)) if done else 0}


def lua_post(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


def lua_rotating_keys(path: Path, token_file: Path) -> Path:
    path.write_text(f"""
local tokens = {{}}
for line in io.lines("{token_file}") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format("GET", "/v1/models", {{["Authorization"] = "Bearer " .. tokens[i]}})
end
""")
    return path


async def seed(home: Path, extra_keys: int = 0) -> dict[str, Any]:
    kp = Keyplane(Settings(home=home))
    await kp.migrate()
    boot = await kp.bootstrap()
    who = system(boot.org_id)
    await kp.limit_profiles.create(who, LimitProfileCreate(name="bench", requests_per_minute=10_000_000))
    _, key = await kp.keys.create(who, KeyCreate(name="bench", scopes=["models:read", "chats:create"],
                                                 ip_allowlist=["127.0.0.0/8", "10.0.0.0/8"], limit_profile="bench"))
    tokens_out: list[str] = []
    if extra_keys:
        tokens_out = await bulk_keys(kp, boot.org_id, extra_keys)
    await kp.db.dispose()
    return {"admin": boot.admin_token, "key": key, "many": tokens_out}


async def bulk_keys(kp: Keyplane, org_id: str, n: int) -> list[str]:
    """Insert n keys directly (the service path would also write n audit events; not what is measured)."""
    from sqlalchemy import insert

    from keyplane.store.models import LimitProfile, VirtualKey

    now = datetime.now(UTC)
    out = []
    async with kp.db.write() as s:
        from sqlalchemy import select

        profile_id = (await s.execute(select(LimitProfile.id).where(LimitProfile.name == "bench"))).scalar_one()
        rows = []
        for i in range(n):
            t = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
            out.append(t)
            rows.append({"id": f"key_bulk{i:08d}", "org_id": org_id, "name": f"bulk-{i}",
                         "key_hash": tokens.hash_token(t), "key_mask": tokens.mask(t), "status": "enabled",
                         "scopes": ["models:read"], "ip_allowlist": ["127.0.0.0/8"], "limit_profile_id": profile_id,
                         "meta": {"team": f"t{i % 50}"}, "allowed_models": [], "require_signature": False,
                         "created_at": now, "updated_at": now, "created_by": "bench", "request_count": 0})
            if len(rows) == 5000:
                await s.execute(insert(VirtualKey), rows)
                rows = []
        if rows:
            await s.execute(insert(VirtualKey), rows)
    return out


async def memory_per_key(home: Path, many: list[str], n: int) -> float:
    kp = Keyplane(Settings(home=home))
    for t in many[:200]:
        await kp.lookup_key(t)  # warm imports and pools
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for t in many[200:200 + n]:
        await kp.lookup_key(t)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(kp.key_cache.positive) == n + 200
    await kp.db.dispose()
    return (after - before) / n


async def uncontended_miss_latency(home: Path, many: list[str], n: int = 2000) -> dict[str, float]:
    """One lookup at a time, each a key not yet cached: the store round trip itself."""
    kp = Keyplane(Settings(home=home))
    for t in many[-100:]:
        await kp.lookup_key(t)
    times = []
    for t in many[:n]:
        start = time.perf_counter()
        assert await kp.lookup_key(t) is not None
        times.append((time.perf_counter() - start) * 1000)
    await kp.db.dispose()
    times.sort()
    return {"p50_ms": round(times[len(times) // 2], 3), "p99_ms": round(times[int(len(times) * 0.99)], 3)}


def measure_server(server: str, seconds: int, rounds: int, work: Path, info: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "KEYPLANE_HOME": str(work / "home"), "BENCH_TOKENS": json.dumps([info["key"]])}
    base_port, kp_port = free_port(), free_port()
    baseline = Proc(server_command(server, "bench.baseline_app:app", base_port), env, work / f"{server}-base.log")
    keyplane = Proc(server_command(server, "keyplane.asgi:app", kp_port), env, work / f"{server}-kp.log")
    try:
        baseline.wait(f"http://127.0.0.1:{base_port}/v1/models")
        keyplane.wait(f"http://127.0.0.1:{kp_port}/healthz")
        key_h = {"Authorization": f"Bearer {info['key']}"}
        verify_lua = lua_post(work / "verify.lua", {"key": info["key"], "scopes": ["models:read"], "ip": "10.1.1.1"})
        runs = {
            "a_bare_starlette": (f"http://127.0.0.1:{base_port}/v1/models", key_h, None),
            "b_verify_api": (f"http://127.0.0.1:{kp_port}/api/v1/keys/verify",
                             {"Authorization": f"Bearer {info['admin']}"}, verify_lua),
            "c_v1_models": (f"http://127.0.0.1:{kp_port}/v1/models", key_h, None),
        }
        for url, headers, script in runs.values():
            wrk(url, 2, headers, script)  # warm-up
        # Rounds interleave the three endpoints so that drift on a shared machine hits all alike;
        # each figure is the median over the rounds.
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (url, headers, script) in runs.items():
                sample = wrk(url, seconds, headers, script)
                assert sample["non_2xx"] == 0, (name, sample)
                samples[name].append(sample)
        return {name: {m: statistics.median(x[m] for x in xs) for m in ("rps", "p50_ms", "p99_ms")}
                for name, xs in samples.items()}
    finally:
        baseline.stop()
        keyplane.stop()


def measure_misses(server: str, seconds: int, work: Path, many: list[str]) -> dict[str, float]:
    env = {**os.environ, "KEYPLANE_HOME": str(work / "home"), "KEYPLANE_KEY_CACHE_TTL_SECONDS": "600"}
    port = free_port()
    token_file = work / "tokens.txt"
    token_file.write_text("\n".join(many) + "\n")
    proc = Proc(server_command(server, "keyplane.asgi:app", port), env, work / f"{server}-miss.log")
    try:
        proc.wait(f"http://127.0.0.1:{port}/healthz")
        script = lua_rotating_keys(work / "rotate.lua", token_file)
        result = wrk(f"http://127.0.0.1:{port}/v1/models", seconds, {}, script)
        hits = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        misses = float(re.search(r'keyplane_key_cache_misses_total\{cache="virtual_keys"\} ([\d.e+]+)', hits)
                       .group(1))  # type: ignore[union-attr]
        result["cache_misses"] = misses
        return result
    finally:
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--servers", default="uvicorn,granian")
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cores": os.cpu_count(),
                              "connections": CONNECTIONS, "seconds": args.seconds, "rounds": args.rounds,
                              "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = asyncio.run(seed(work / "home", extra_keys=args.keys))
        for server in args.servers.split(","):
            res = measure_server(server, args.seconds, args.rounds, work, info)
            base = res["a_bare_starlette"]
            for r in res.values():
                r["throughput_vs_a"] = round(r["rps"] / base["rps"], 3)
                r["p99_vs_a"] = round(r["p99_ms"] / base["p99_ms"], 3)
            report["servers"][server] = res
        if args.keys:
            server = "uvicorn" if "uvicorn" in report["servers"] else next(iter(report["servers"]))
            report["cache_miss"] = {"server": server, "keys_in_store": args.keys + 1,
                                    **measure_misses(server, args.seconds, work, info["many"])}
            report["uncontended_miss"] = asyncio.run(uncontended_miss_latency(work / "home", info["many"]))
            report["memory_per_cached_key_bytes"] = round(asyncio.run(
                memory_per_key(work / "home", info["many"], min(20_000, args.keys - 200))))
    print_report(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "hotpath.json").write_text(json.dumps(report, indent=2))


def print_report(report: dict[str, Any]) -> None:
    print(f"\nhot path, {report['cores']} cores, wrk -t1 -c{report['connections']} -d{report['seconds']}s, "
          f"median of {report['rounds']} interleaved rounds, server and wrk pinned to separate cores\n")
    print(f"{'server':8} {'endpoint':18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'rps/a':>7} {'p99/a':>7}")
    for server, res in report["servers"].items():
        for name, r in res.items():
            print(f"{server:8} {name:18} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                  f"{r['throughput_vs_a']:7.2f} {r['p99_vs_a']:7.2f}")
    if "cache_miss" in report:
        m = report["cache_miss"]
        print(f"\ncache misses ({m['server']}, {m['keys_in_store']} keys in store, every request a new key): "
              f"{m['rps']:.0f} req/s, p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, "
              f"{m['cache_misses']:.0f} misses")
        u = report["uncontended_miss"]
        print(f"one miss at a time (in process, SQLite): p50 {u['p50_ms']:.2f} ms, p99 {u['p99_ms']:.2f} ms")
        print(f"memory per cached key: {report['memory_per_cached_key_bytes']} bytes")


if __name__ == "__main__":
    main()
