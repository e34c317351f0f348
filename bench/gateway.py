"""Gateway benchmark: the same local OpenAI-compatible upstream, directly and through keyplane, same run.

    python bench/gateway.py                 # ~2 minutes
    python bench/gateway.py --seconds 5

Reports added p50/p99 latency at moderate load (8 connections), throughput at high load
(64 connections), and streaming time to first byte, each as keyplane vs direct. keyplane (uvicorn,
one worker) is pinned to core 0; the upstream and wrk share core 1 in both measurements.
Needs `wrk` (Debian: apt-get install wrk).
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
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hotpath import BIN, Proc, free_port, lua_post, wrk  # noqa: E402
from keyplane.config import Settings  # noqa: E402
from keyplane.services.container import Keyplane  # noqa: E402
from keyplane.services.principal import system  # noqa: E402
from keyplane.services.schemas import KeyCreate, LimitProfileCreate, ModelPrice, ProviderCreate  # noqa: E402

BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "hello"}]}


class Pinned(Proc):
    def __init__(self, core: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        import subprocess

        self.log = log.open("w")
        self.p = subprocess.Popen(["taskset", "-c", core, *cmd], env=env, cwd=ROOT, stdout=self.log,
                                  stderr=subprocess.STDOUT, start_new_session=True)


def uvicorn_cmd(target: str, port: int) -> list[str]:
    return [str(BIN / "uvicorn"), target, "--port", str(port), "--no-access-log", "--log-level", "warning",
            "--loop", "uvloop", "--http", "httptools"]


async def seed(home: Path, upstream_url: str) -> str:
    kp = Keyplane(Settings(home=home))
    await kp.migrate()
    boot = await kp.bootstrap()
    who = system(boot.org_id)
    await kp.limit_profiles.create(who, LimitProfileCreate(name="bench", requests_per_minute=10_000_000))
    prices = [ModelPrice(name="bench-model", input_per_mtok=1, output_per_mtok=2)]
    await kp.providers.create(who, ProviderCreate(name="local", base_url=f"{upstream_url}/v1",
                                                  api_key="sk-bench-upstream", models=prices))
    _, key = await kp.keys.create(who, KeyCreate(name="bench", limit_profile="bench"))
    await kp.db.dispose()
    return key


async def ttfb(url: str, headers: dict[str, str], n: int) -> dict[str, float]:
    """Time to first byte of a streamed answer, one request at a time."""
    samples = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(n):
            start = time.perf_counter()
            async with client.stream("POST", url, json={**BODY, "stream": True}, headers=headers) as resp:
                first = True
                async for _chunk in resp.aiter_raw():
                    if first:
                        samples.append((time.perf_counter() - start) * 1000)
                        first = False
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(samples[int(len(samples) * 0.99)], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--litellm", help="path to a `litellm` executable (pip install 'litellm[proxy]' in its own "
                                          "venv) to measure LiteLLM Proxy against the same upstream, same run")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, kp_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        key = asyncio.run(seed(work / "home", upstream_url))
        env = {**os.environ, "KEYPLANE_HOME": str(work / "home")}
        upstream = Pinned("1", uvicorn_cmd("bench.fake_upstream:app", up_port), env, work / "up.log")
        keyplane = Pinned("0", uvicorn_cmd("keyplane.asgi:app", kp_port), env, work / "kp.log")
        litellm = None
        if args.litellm:
            ll_port = free_port()
            config = work / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench-model\n    litellm_params:\n      model: openai/bench-model\n"
                f"      api_base: {upstream_url}/v1\n      api_key: sk-bench-upstream\n"
                "general_settings:\n  master_key: sk-litellm-bench\n")
            ll_env = {**env, "LITELLM_LOG": "ERROR"}
            litellm = Pinned("0", [args.litellm, "--config", str(config), "--port", str(ll_port), "--num_workers", "1"],
                             ll_env, work / "litellm.log")
        try:
            upstream.wait(f"{upstream_url}/v1/chat/completions")
            keyplane.wait(f"http://127.0.0.1:{kp_port}/healthz")
            script = lua_post(work / "chat.lua", BODY)
            targets = {"direct": f"{upstream_url}/v1/chat/completions",
                       "keyplane": f"http://127.0.0.1:{kp_port}/v1/chat/completions"}
            headers = {"direct": {"Authorization": "Bearer sk-bench-upstream"},
                       "keyplane": {"Authorization": f"Bearer {key}"}}
            if litellm is not None:
                litellm.wait(f"http://127.0.0.1:{ll_port}/health/liveliness")
                targets["litellm"] = f"http://127.0.0.1:{ll_port}/v1/chat/completions"
                headers["litellm"] = {"Authorization": "Bearer sk-litellm-bench"}
            report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                                      "seconds": args.seconds, "rounds": args.rounds}
            import bench.hotpath as hp

            for label, connections in (("moderate_c8", 8), ("high_c64", 64)):
                hp.CONNECTIONS = connections
                samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for name in targets:
                    wrk(targets[name], 2, headers[name], script)
                for _ in range(args.rounds):
                    for name in targets:
                        sample = wrk(targets[name], args.seconds, headers[name], script)
                        assert sample["non_2xx"] == 0, (name, sample)
                        samples[name].append(sample)
                report[label] = {name: {m: statistics.median(s[m] for s in xs) for m in ("rps", "p50_ms", "p99_ms")}
                                 for name, xs in samples.items()}
            report["stream_ttfb"] = {name: asyncio.run(ttfb(targets[name], headers[name], 300)) for name in targets}
        finally:
            keyplane.stop()
            upstream.stop()
            if litellm is not None:
                litellm.stop()
    m, h, t = report["moderate_c8"], report["high_c64"], report["stream_ttfb"]
    report["added_p50_ms_moderate"] = round(m["keyplane"]["p50_ms"] - m["direct"]["p50_ms"], 3)
    report["added_p99_ms_moderate"] = round(m["keyplane"]["p99_ms"] - m["direct"]["p99_ms"], 3)
    report["throughput_ratio_high"] = round(h["keyplane"]["rps"] / h["direct"]["rps"], 3)
    report["added_ttfb_p50_ms"] = round(t["keyplane"]["p50_ms"] - t["direct"]["p50_ms"], 3)
    if "litellm" in h:
        report["litellm_added_p50_ms_moderate"] = round(m["litellm"]["p50_ms"] - m["direct"]["p50_ms"], 3)
        report["litellm_throughput_ratio_high"] = round(h["litellm"]["rps"] / h["direct"]["rps"], 3)
        report["keyplane_vs_litellm_throughput"] = round(h["keyplane"]["rps"] / h["litellm"]["rps"], 2)
    print(json.dumps(report, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "gateway.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
