"""Gateway benchmark: the same local upstream, directly and through keyplane, same run.

    python bench/gateway.py                 # ~3 minutes
    python bench/gateway.py --seconds 5
    python bench/gateway.py --budget-only   # a key without vs with a budget, paired rounds (~1.5 minutes)
    python bench/gateway.py --budget-only --before /tmp/old   # … in this tree and in another, same run (~3)
    python bench/gateway.py --budget-only --budget-phases high_c64 --budget-rounds 40   # the ratio alone (~4)
    python bench/gateway.py --before /tmp/old --core-only   # + keyplane from another source tree, same run

Reports added p50/p99 latency at 1 and 8 connections, throughput at high load (64 connections) with the CPU
each keyplane process spent per proxied request (user + system, from /proc), and streaming time to first
byte, each as keyplane vs direct, for Chat Completions. ``--before DIR`` also starts keyplane from the
source tree DIR (e.g. ``git archive main | tar -x -C /tmp/old``) as ``keyplane_before``, on the same
home and upstream, measured in the same interleaved rounds. ``--core-only`` skips what follows.

Reports added p50/p99 latency at moderate load (8 connections), throughput at high load
(64 connections), and streaming time to first byte, each as keyplane vs direct, for Chat Completions;
and for the Anthropic Messages API (`/v1/messages`, key in `x-api-key` as Claude Code's SDK sends
it) throughput at 64 connections and streaming time to first byte; and the cost of a budget (issue 17:
reserve before forwarding, settle after): the same keyplane, a key without and a key with token, daily
and monthly limits (never reached), at 1, 8 and 64 connections in short paired rounds whose order
alternates, reported as the median per-round difference (ratio at 64) with its interquartile range and a
bootstrap 95% interval (``--budget-rounds``, ``--budget-seconds``). keyplane (uvicorn,
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
import subprocess
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
MESSAGES_BODY = {"model": "bench-claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}


class Pinned(Proc):
    def __init__(self, core: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        import subprocess

        self.log = log.open("w")
        self.p = subprocess.Popen(["taskset", "-c", core, *cmd], env=env, cwd=cwd, stdout=self.log,
                                  stderr=subprocess.STDOUT, start_new_session=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (taskset execs the server: its pid is the server's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uvicorn_cmd(target: str, port: int) -> list[str]:
    return [str(BIN / "uvicorn"), target, "--port", str(port), "--no-access-log", "--log-level", "warning",
            "--loop", "uvloop", "--http", "httptools"]


def keyplane_cmd(port: int, tree: Path = ROOT) -> list[str]:
    """keyplane as ``keyplane serve`` runs it: its own httptools protocol (keyplane/http_protocol.py),
    uvicorn's own X-Forwarded-For rewriting and Server header off
    (keyplane resolves clients itself, KEYPLANE_TRUSTED_PROXIES). uvicorn's middleware was ~2% of a profile's
    samples; the difference in CPU per request was below this machine's noise (docs/performance.md)."""
    cmd = [*uvicorn_cmd("keyplane.asgi:app", port), "--no-proxy-headers", "--no-server-header"]
    protocol = tree / "keyplane" / "http_protocol.py"
    if protocol.exists() and "ShapedHttpToolsProtocol" in protocol.read_text():  # older trees: uvicorn's own
        cmd[cmd.index("httptools")] = "keyplane.http_protocol:ShapedHttpToolsProtocol"  # keyplane serve's
    return cmd


async def seed(home: Path, upstream_url: str) -> tuple[str, str]:
    kp = Keyplane(Settings(home=home))
    await kp.migrate()
    boot = await kp.bootstrap()
    who = system(boot.org_id)
    await kp.limit_profiles.create(who, LimitProfileCreate(name="bench", requests_per_minute=10_000_000))
    prices = [ModelPrice(name="bench-model", input_per_mtok=1, output_per_mtok=2)]
    await kp.providers.create(who, ProviderCreate(name="local", base_url=f"{upstream_url}/v1",
                                                  api_key="sk-bench-upstream", models=prices))
    claude = [ModelPrice(name="bench-claude", input_per_mtok=3, output_per_mtok=15, cache_write_per_mtok=3.75,
                         cache_read_per_mtok=0.3)]
    await kp.providers.create(who, ProviderCreate(name="claude", kind="anthropic", base_url=f"{upstream_url}/v1",
                                                  api_key="sk-ant-bench-upstream", models=claude))
    _, key = await kp.keys.create(who, KeyCreate(name="bench", limit_profile="bench"))
    # Every spend window set (and never reached): each request reserves and settles in all three.
    await kp.limit_profiles.create(who, LimitProfileCreate(
        name="bench-budget", requests_per_minute=10_000_000, tokens_per_minute=2_000_000_000,
        cost_per_day_usd=1e9, budget_per_month_usd=1e10))
    _, budgeted = await kp.keys.create(who, KeyCreate(name="bench-budget", limit_profile="bench-budget"))
    await kp.db.dispose()
    return key, budgeted


def paired(values: list[float], digits: int = 3) -> dict[str, Any]:
    """The median of per-round paired values (differences or ratios), their interquartile range, and a 95%
    bootstrap interval of that median (2,000 resamples, fixed seed): one noisy round does not decide."""
    import random

    xs = sorted(values)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    rng = random.Random(17)
    boot = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
    return {"median": round(statistics.median(xs), digits), "iqr": [round(q[0], digits), round(q[2], digits)],
            "ci95": [round(boot[50], digits), round(boot[1949], digits)], "rounds": len(xs)}


# (label, connections, seconds per sample in units of --budget-seconds): at 64 connections a 1 s sample is
# mostly wrk's connecting and the first requests' queue, and its ratio moved by ±10%: twice as long.
BUDGET_PHASES = (("single_c1", 1, 1), ("moderate_c8", 8, 1), ("high_c64", 64, 2))


def measure_budget(urls: dict[str, str], pids: dict[str, int], key: str, budgeted: str, work: Path,
                   rounds: int, seconds: int, phases: tuple[str, ...] = ()) -> dict[str, Any]:
    """The same route and keyplane, a key without and one with a budget, paired (same run).

    ``urls``: keyplane (and keyplane_before with ``--before``) -> its chat URL; ``pids``: their processes,
    whose user + system CPU over the requests wrk completed is each sample's ``cpu_us_per_request``.
    At 1, 8 and 64 connections, ``rounds`` short rounds of ``seconds`` per key (twice that at 64); the order
    alternates from round to round (A B, B A, A B …: every pair of samples is adjacent, and neither key always
    goes first). Each
    round gives one paired difference (p50, CPU per request) or ratio (requests/s); the report is the median
    of those with their interquartile range and a bootstrap interval (:func:`paired`)."""
    import bench.hotpath as hp

    script = lua_post(work / "chat.lua", BODY)
    keys = {"no_budget": {"Authorization": f"Bearer {key}"}, "budget": {"Authorization": f"Bearer {budgeted}"}}
    prefix = {"keyplane": "", "keyplane_before": "before_"}
    targets = {prefix[server] + name: (url, keys[name], pids[server]) for server, url in urls.items() for name in keys}
    out: dict[str, Any] = {}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for label, connections, length in BUDGET_PHASES:
        if phases and label not in phases:
            continue
        hp.CONNECTIONS = connections
        samples[label] = {name: [] for name in targets}
        for url, headers, _pid in targets.values():
            wrk(url, 1, headers, script)
        for round_no in range(rounds):
            for name in (list(targets) if round_no % 2 == 0 else list(reversed(targets))):
                url, headers, pid = targets[name]
                cpu = cpu_seconds(pid)
                sample = wrk(url, seconds * length, headers, script)
                sample["cpu_us_per_request"] = round((cpu_seconds(pid) - cpu) / max(sample["requests"], 1) * 1e6, 1)
                assert sample["non_2xx"] == 0, (name, sample)
                samples[label][name].append(sample)
        out[label] = {name: {m: statistics.median(s[m] for s in xs) for m in ("rps", "p50_ms", "p99_ms",
                                                                              "cpu_us_per_request")}
                      for name, xs in samples[label].items()}
    for server in urls:
        no, yes = prefix[server] + "no_budget", prefix[server] + "budget"

        def diffs(label: str, metric: str, no: str = no, yes: str = yes) -> list[float]:
            return [b[metric] - a[metric] for a, b in zip(samples[label][no], samples[label][yes], strict=True)]

        summary: dict[str, Any] = {}
        if "single_c1" in samples:
            summary["added_p50_ms_c1"] = paired(diffs("single_c1", "p50_ms"))
        if "moderate_c8" in samples:
            summary["added_p50_ms_c8"] = paired(diffs("moderate_c8", "p50_ms"))
        if "high_c64" in samples:
            c64 = samples["high_c64"]
            summary["throughput_ratio_c64"] = paired([b["rps"] / a["rps"]
                                                      for a, b in zip(c64[no], c64[yes], strict=True)])
        for label, short in (("single_c1", "c1"), ("moderate_c8", "c8"), ("high_c64", "c64")):
            if label in samples:
                summary[f"added_cpu_us_per_request_{short}"] = paired(diffs(label, "cpu_us_per_request"), 1)
        out[f"{server}_summary"] = summary
    out["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    # every sample as it came (requests/s, CPU µs per request), round by round: where the spread comes from
    out["samples"] = {label: {name: [(s["rps"], s["cpu_us_per_request"]) for s in xs] for name, xs in by.items()}
                      for label, by in samples.items()}
    return out


def print_budget(budget: dict[str, Any]) -> None:
    """One line per paired figure (the whole report goes to bench/results/budget.json)."""
    print(f"{budget['when']}  load average {' '.join(budget['loadavg'])}  {budget['rounds']} rounds")
    for server in ("keyplane_before", "keyplane"):
        for name, fig in budget.get(f"{server}_summary", {}).items():
            print(f"{server:16s} {name:30s} median {fig['median']:>8}  IQR {fig['iqr'][0]} … {fig['iqr'][1]}"
                  f"  95% bootstrap {fig['ci95'][0]} … {fig['ci95'][1]}")


async def ttfb(url: str, headers: dict[str, str], n: int, body: dict[str, Any] = BODY) -> dict[str, float]:
    """Time to first byte of a streamed answer, one request at a time."""
    samples = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(n):
            start = time.perf_counter()
            async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as resp:
                first = True
                async for _chunk in resp.aiter_raw():
                    if first:
                        samples.append((time.perf_counter() - start) * 1000)
                        first = False
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(samples[int(len(samples) * 0.99)], 3)}


def measure_messages(upstream_url: str, keyplane_url: str, key: str, work: Path,
                     args: argparse.Namespace) -> dict[str, Any]:
    """/v1/messages: non-streaming at 64 connections and streaming TTFB, keyplane vs direct (same run)."""
    import bench.hotpath as hp

    script = lua_post(work / "messages.lua", MESSAGES_BODY)
    targets = {"direct": f"{upstream_url}/v1/messages", "keyplane": f"{keyplane_url}/v1/messages"}
    version = {"anthropic-version": "2023-06-01"}
    headers = {"direct": {"x-api-key": "sk-ant-bench-upstream", **version},
               "keyplane": {"x-api-key": key, **version}}
    hp.CONNECTIONS = 64
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for name in targets:
        wrk(targets[name], 2, headers[name], script)
    for _ in range(args.rounds):
        for name in targets:
            sample = wrk(targets[name], args.seconds, headers[name], script)
            assert sample["non_2xx"] == 0, (name, sample)
            samples[name].append(sample)
    return {
        "high_c64": {name: {m: statistics.median(s[m] for s in xs) for m in ("rps", "p50_ms", "p99_ms")}
                     for name, xs in samples.items()},
        "stream_ttfb": {name: asyncio.run(ttfb(targets[name], headers[name], 300, MESSAGES_BODY))
                        for name in targets},
    }


def seed_in_tree(tree: Path, home: Path, upstream_url: str) -> str:
    """Seed ``home`` with another source tree's own code (its bench.gateway.seed); its plain key."""
    code = ("import asyncio, sys; from pathlib import Path; sys.path.insert(0, '.'); "
            "from bench.gateway import seed; got = asyncio.run(seed(Path(sys.argv[1]), sys.argv[2])); "
            "print(got if isinstance(got, str) else got[0])")
    done = subprocess.run([sys.executable, "-c", code, str(home), upstream_url], cwd=tree, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-only", action="store_true",
                        help="measure only a key without vs with a budget (writes bench/results/budget.json)")
    parser.add_argument("--budget-rounds", type=int, default=12,
                        help="paired rounds per connection count in the budget measurement")
    parser.add_argument("--budget-phases", default="",
                        help="only these of single_c1,moderate_c8,high_c64 (comma-separated): e.g. many rounds of "
                             "high_c64 alone, where each sample's spread on a noisy machine needs more rounds")
    parser.add_argument("--budget-seconds", type=int, default=1,
                        help="seconds of each budget sample (twice that at 64 connections)")
    parser.add_argument("--before", type=Path, help="a keyplane source tree to measure beside this one, same run")
    parser.add_argument("--before-own-home", action="store_true",
                        help="the --before tree seeds and serves its own store with its own code (for trees whose "
                             "schema is older than this one's, e.g. the tree issue 19 measured: f8f2763)")
    parser.add_argument("--core-only", action="store_true", help="skip the Messages API and budget measurements")
    parser.add_argument("--litellm", help="path to a `litellm` executable (pip install 'litellm[proxy]' in its own "
                                          "venv) to measure LiteLLM Proxy against the same upstream, same run")
    args = parser.parse_args()
    if args.before_own_home and (args.budget_only or not args.before):
        parser.error("--before-own-home needs --before and measures the core figures only (no budget key there)")
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, kp_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        key, budgeted = asyncio.run(seed(work / "home", upstream_url))
        env = {**os.environ, "KEYPLANE_HOME": str(work / "home")}
        upstream = Pinned("1", uvicorn_cmd("bench.fake_upstream:app", up_port), env, work / "up.log")
        keyplane = Pinned("0", keyplane_cmd(kp_port), env, work / "kp.log")
        before = None
        if args.before:
            before_port = free_port()
            before_env, before_key = env, key
            if args.before_own_home:
                before_key = seed_in_tree(args.before.resolve(), work / "before-home", upstream_url)
                before_env = {**os.environ, "KEYPLANE_HOME": str(work / "before-home")}
            before = Pinned("0", keyplane_cmd(before_port, args.before.resolve()), before_env, work / "before.log",
                            cwd=args.before.resolve())
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
            if args.budget_only:
                urls = {"keyplane": f"http://127.0.0.1:{kp_port}/v1/chat/completions"}
                pids = {"keyplane": keyplane.p.pid}
                if before is not None:
                    before.wait(f"http://127.0.0.1:{before_port}/healthz")
                    urls["keyplane_before"] = f"http://127.0.0.1:{before_port}/v1/chat/completions"
                    pids["keyplane_before"] = before.p.pid
                budget = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                          "seconds": args.budget_seconds, "rounds": args.budget_rounds,
                          **measure_budget(urls, pids, key, budgeted, work, args.budget_rounds, args.budget_seconds,
                                           tuple(args.budget_phases.split(",")) if args.budget_phases else ())}
                print_budget(budget)
                (ROOT / "bench" / "results").mkdir(exist_ok=True)
                (ROOT / "bench" / "results" / "budget.json").write_text(json.dumps(budget, indent=2))
                return
            script = lua_post(work / "chat.lua", BODY)
            targets = {"direct": f"{upstream_url}/v1/chat/completions",
                       "keyplane": f"http://127.0.0.1:{kp_port}/v1/chat/completions"}
            headers = {"direct": {"Authorization": "Bearer sk-bench-upstream"},
                       "keyplane": {"Authorization": f"Bearer {key}"}}
            pids = {"keyplane": keyplane.p.pid}
            if before is not None:
                before.wait(f"http://127.0.0.1:{before_port}/healthz")
                targets["keyplane_before"] = f"http://127.0.0.1:{before_port}/v1/chat/completions"
                headers["keyplane_before"] = {"Authorization": f"Bearer {before_key}"}
                pids["keyplane_before"] = before.p.pid
            if litellm is not None:
                litellm.wait(f"http://127.0.0.1:{ll_port}/health/liveliness")
                targets["litellm"] = f"http://127.0.0.1:{ll_port}/v1/chat/completions"
                headers["litellm"] = {"Authorization": "Bearer sk-litellm-bench"}
            report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
                                      "seconds": args.seconds, "rounds": args.rounds}
            import bench.hotpath as hp

            for label, connections in (("single_c1", 1), ("moderate_c8", 8), ("high_c64", 64)):
                hp.CONNECTIONS = connections
                samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for name in targets:
                    wrk(targets[name], 2, headers[name], script)
                for round_no in range(args.rounds):
                    for name in (list(targets) if round_no % 2 == 0 else list(reversed(targets))):
                        cpu = cpu_seconds(pids[name]) if name in pids else 0.0
                        sample = wrk(targets[name], args.seconds, headers[name], script)
                        if name in pids:
                            sample["cpu_us_per_request"] = round(
                                (cpu_seconds(pids[name]) - cpu) / max(sample["requests"], 1) * 1e6, 1)
                        assert sample["non_2xx"] == 0, (name, sample)
                        samples[name].append(sample)
                report[label] = {name: {m: statistics.median(s[m] for s in xs)
                                        for m in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request") if m in xs[0]}
                                 for name, xs in samples.items()}
            report["stream_ttfb"] = {name: asyncio.run(ttfb(targets[name], headers[name], 300)) for name in targets}
            if args.core_only:
                return report_core(report)
            report["messages"] = measure_messages(upstream_url, f"http://127.0.0.1:{kp_port}", key, work, args)
            report["budget"] = measure_budget({"keyplane": targets["keyplane"]}, {"keyplane": keyplane.p.pid}, key,
                                              budgeted, work, args.budget_rounds, args.budget_seconds)
        finally:
            keyplane.stop()
            upstream.stop()
            if before is not None:
                before.stop()
            # keyplane's access log (one JSON line per request, with its code): why a request was not 2xx
            (ROOT / "bench" / "results").mkdir(exist_ok=True)
            shutil.copy(work / "kp.log", ROOT / "bench" / "results" / "gateway-keyplane.log")
            if litellm is not None:
                litellm.stop()
    report_core(report)


def report_core(report: dict[str, Any]) -> None:
    """The figures for keyplane (and keyplane_before) vs direct; the whole report printed and saved."""
    report["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    for name in ("keyplane", "keyplane_before"):
        if name not in report["high_c64"]:
            continue
        s, h, t = report["single_c1"], report["high_c64"], report["stream_ttfb"]
        report[f"{name}_summary"] = {
            "throughput_ratio_high": round(h[name]["rps"] / h["direct"]["rps"], 3),
            "cpu_us_per_request_high": h[name]["cpu_us_per_request"],
            "added_p50_ms_c1": round(s[name]["p50_ms"] - s["direct"]["p50_ms"], 3),
            "added_ttfb_p99_ms": round(t[name]["p99_ms"] - t["direct"]["p99_ms"], 3),
        }
    if "messages" not in report:
        print(json.dumps(report, indent=2))
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / "gateway-core.json").write_text(json.dumps(report, indent=2))
        return
    msg = report["messages"]
    report["messages_throughput_ratio_high"] = round(msg["high_c64"]["keyplane"]["rps"]
                                                     / msg["high_c64"]["direct"]["rps"], 3)
    report["messages_added_ttfb_p50_ms"] = round(msg["stream_ttfb"]["keyplane"]["p50_ms"]
                                                 - msg["stream_ttfb"]["direct"]["p50_ms"], 3)
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
