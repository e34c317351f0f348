"""Distributed-mode benchmark: the enforced hot path (GET /v1/models with a rate-limited key) in four set-ups,
measured in one run with interleaved rounds so drift on a shared machine hits all alike.

    python bench/distributed.py                  # 10 s per measurement, 3 rounds
    python bench/distributed.py --seconds 5 --rounds 1

(a) bare Starlette endpoint (the floor), one process on core 0, wrk on core 1
(b) keyplane, 1 process, in-memory limiter (embedded mode), core 0, wrk on core 1
(c) keyplane, 1 process, limiter in Redis (one Lua script per request), core 0, wrk on core 1
(d) keyplane `serve --workers 2`, limiter in Redis, unpinned: the workers, wrk and Redis share both cores

(c) against (b) is the added cost of the Redis round trip; (d) against (c) is what a second worker buys on
this 2-core machine. Needs `wrk` (Debian: apt-get install wrk) and Redis (BENCH_REDIS_URL, default
redis://127.0.0.1:6379/0; keys go under a namespace of their own and are deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hotpath import Proc, free_port, seed, server_command, wrk  # noqa: E402

BIN = Path(sys.executable).parent


def keyplane_serve(port: int, workers: int) -> list[str]:
    return [str(BIN / "keyplane"), "serve", "--port", str(port), "--workers", str(workers)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    namespace = f"bench-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="kp-bench-dist-"))
    info: dict[str, Any] = asyncio.run(seed(work / "home"))
    base_env = {**{k: v for k, v in os.environ.items() if not k.startswith("KEYPLANE_")},
                "KEYPLANE_HOME": str(work / "home"), "KEYPLANE_LOG_LEVEL": "WARNING", "KEYPLANE_ACCESS_LOG": "false"}
    redis_env = {**base_env, "KEYPLANE_REDIS_URL": redis_url, "KEYPLANE_REDIS_NAMESPACE": namespace}
    ports = {name: free_port() for name in "abcd"}
    procs = {
        "a_bare_starlette": Proc(server_command("uvicorn", "bench.baseline_app:app", ports["a"]),
                                 {**base_env, "BENCH_TOKENS": json.dumps([info["key"]])}, work / "a.log", "0"),
        "b_memory_limiter_1_worker": Proc(keyplane_serve(ports["b"], 1), base_env, work / "b.log", "0"),
        "c_redis_limiter_1_worker": Proc(keyplane_serve(ports["c"], 1), redis_env, work / "c.log", "0"),
        "d_redis_limiter_2_workers": Proc(keyplane_serve(ports["d"], 2), redis_env, work / "d.log", None),
    }
    urls = dict(zip(procs, (f"http://127.0.0.1:{ports[n]}/v1/models" for n in "abcd"), strict=True))
    headers = {"Authorization": f"Bearer {info['key']}"}
    try:
        for name, proc in procs.items():
            proc.wait(urls[name].replace("/v1/models", "/healthz" if name[0] != "a" else "/v1/models"))
        for url in urls.values():
            wrk(url, 2, headers)  # warm-up: caches filled, connections made
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in procs}
        for _ in range(args.rounds):
            for name, url in urls.items():
                sample = wrk(url, args.seconds, headers)
                assert sample["non_2xx"] == 0, (name, sample)
                samples[name].append(sample)
    finally:
        for proc in procs.values():
            proc.stop()
        keys = subprocess.run(["redis-cli", "-u", redis_url, "--scan", "--pattern", f"{namespace}:*"],
                              capture_output=True, text=True).stdout.split()
        if keys:
            subprocess.run(["redis-cli", "-u", redis_url, "del", *keys], capture_output=True)
    result = {name: {m: statistics.median(x[m] for x in xs) for m in ("rps", "p50_ms", "p99_ms")}
              for name, xs in samples.items()}
    b, c, d = (result[k] for k in ("b_memory_limiter_1_worker", "c_redis_limiter_1_worker",
                                   "d_redis_limiter_2_workers"))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": args.seconds, "rounds": args.rounds,
        "connections": 64, "results": result,
        "ratios": {
            "redis_vs_memory_throughput": round(c["rps"] / b["rps"], 3),
            "redis_added_p50_ms": round(c["p50_ms"] - b["p50_ms"], 3),
            "two_workers_vs_one_throughput": round(d["rps"] / c["rps"], 3),
            "memory_1_worker_vs_bare": round(b["rps"] / result["a_bare_starlette"]["rps"], 3),
        },
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(report, indent=2))
    print(f"{'set-up':32} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in result.items():
        print(f"{name:32} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
