"""Two keyplane source trees, interleaved, same home and upstream: CPU µs per proxied request, per round.

    git archive main | tar -x -C /tmp/old
    python bench/gateway_ab.py /tmp/old . --connections 64 --seconds 4 --rounds 8

Each keyplane (uvicorn, one worker, run as bench/gateway.py runs it) is pinned to core 0, the upstream and
wrk to core 1; the rounds alternate their order. CPU per request is the keyplane process's user + system
time over the requests wrk completed: on a shared machine a steadier figure than requests per second.
Prints each tree's samples and medians, and B/A per round (how many rounds B was lower in).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.hotpath as hp  # noqa: E402
from bench.gateway import BODY, Pinned, cpu_seconds, keyplane_cmd, seed, uvicorn_cmd  # noqa: E402
from bench.hotpath import free_port, lua_post, wrk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="source tree A (e.g. the tree before a change)")
    parser.add_argument("b", type=Path, help="source tree B")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port = free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        key, _ = asyncio.run(seed(work / "home", upstream_url))
        env = {**os.environ, "KEYPLANE_HOME": str(work / "home")}
        upstream = Pinned("1", uvicorn_cmd("bench.fake_upstream:app", up_port), env, work / "up.log")
        servers: dict[str, tuple[Pinned, str]] = {}
        for name, tree in trees.items():
            port = free_port()
            servers[name] = (Pinned("0", keyplane_cmd(port, tree), env, work / f"{name}.log", cwd=tree),
                             f"http://127.0.0.1:{port}")
        try:
            upstream.wait(f"{upstream_url}/v1/chat/completions")
            for proc, base in servers.values():
                proc.wait(f"{base}/healthz")
            script = lua_post(work / "chat.lua", BODY)
            headers = {"Authorization": f"Bearer {key}"}
            hp.CONNECTIONS = args.connections
            for _proc, base in servers.values():
                wrk(f"{base}/v1/chat/completions", 2, headers, script)
            cpu_us: dict[str, list[float]] = {name: [] for name in servers}
            p50: dict[str, list[float]] = {name: [] for name in servers}
            for round_no in range(args.rounds):
                for name in (list(servers) if round_no % 2 == 0 else list(reversed(servers))):
                    proc, base = servers[name]
                    before = cpu_seconds(proc.p.pid)
                    sample = wrk(f"{base}/v1/chat/completions", args.seconds, headers, script)
                    assert sample["non_2xx"] == 0, (name, sample)
                    cpu_us[name].append((cpu_seconds(proc.p.pid) - before) / max(sample["requests"], 1) * 1e6)
                    p50[name].append(sample["p50_ms"])
            for name in servers:
                print(name, trees[name], "cpu_us", [round(x, 1) for x in cpu_us[name]],
                      "median", round(statistics.median(cpu_us[name]), 1),
                      "p50_ms median", statistics.median(p50[name]))
            ratios = [b / a for a, b in zip(cpu_us["A"], cpu_us["B"], strict=True)]
            print("B/A per round", [round(x, 3) for x in ratios], "B lower in", sum(r < 1 for r in ratios), "of",
                  len(ratios), "median", round(statistics.median(ratios), 3))
        finally:
            for proc, _base in servers.values():
                proc.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
