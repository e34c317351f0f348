"""Instructions per request with and without a budget: keyplane's ASGI app called in process, counted by callgrind.

    PYTHONHASHSEED=0 KEYPLANE_ACCESS_LOG=false valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/kpcg/after.%p .venv/bin/python bench/budget_instructions.py --rounds 4
    python bench/budget_instructions.py --sum /tmp/kpcg/after. 1600   # instructions per request, each key
    python bench/budget_instructions.py --rounds 4      # without valgrind: CPU µs per request instead

A load-independent figure for the budget's cost (issue 17): the same chat request through the whole app
(authentication, limits, routing, reserve, forward to bench/fake_upstream.py in another process, settle,
usage event), ``--concurrency`` at a time, for a key without and a key with token, daily and monthly limits
(never reached), in blocks that alternate the order (A B B A). Under callgrind the instrumentation is off
during start-up and warm-up and switched on around each block (``callgrind_control``), and each block is
dumped to its own file: the report sums each key's blocks and divides by the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import BODY, Pinned, seed, uvicorn_cmd  # noqa: E402
from bench.hotpath import free_port  # noqa: E402

UNDER_VALGRIND = "valgrind" in os.environ.get("LD_PRELOAD", "") or any(
    "vgpreload" in line for line in Path("/proc/self/maps").read_text().splitlines())


def callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


async def one(app: Any, token: str, body: bytes) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"authorization", f"Bearer {token}".encode())]}
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def block(app: Any, token: str, n: int, concurrency: int, body: bytes) -> None:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await one(app, token, body)
            assert status == 200, status

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run(args: argparse.Namespace, home: Path, keys: dict[str, str]) -> dict[str, Any]:
    os.environ["KEYPLANE_HOME"] = str(home)
    os.environ.setdefault("KEYPLANE_ACCESS_LOG", "false")
    from keyplane.app import KeyplaneApp
    from keyplane.config import Settings

    app = KeyplaneApp(Settings(home=home))
    await app.startup()
    # The background jobs run by the clock, and under callgrind the clock runs ~50x slower per instruction:
    # stopped here, and what they do per request (write the usage events, last-used times) is done at the
    # end of each block instead, so both keys pay for it in proportion to their requests.
    for task in app.kp._tasks:
        task.cancel()
    await asyncio.gather(*app.kp._tasks, return_exceptions=True)
    app.kp._tasks = []
    body = json.dumps(BODY).encode()

    async def measured(token: str, n: int) -> None:
        await block(app, token, n, args.concurrency, body)
        app.kp.access_log.flush()
        await app.kp.flush()
        await app.kp.flush_usage()

    try:
        for token in keys.values():
            await measured(token, args.warmup)
        gc.collect()
        gc.freeze()  # as keyplane serve does after start-up
        cpu = {name: 0.0 for name in keys}
        for round_no in range(args.rounds):
            order = list(keys) if round_no % 2 == 0 else list(reversed(keys))
            for name in order:
                if UNDER_VALGRIND:
                    callgrind("-i", "on")
                start = time.process_time()
                await measured(keys[name], args.requests)
                cpu[name] += time.process_time() - start
                if UNDER_VALGRIND:
                    callgrind("-i", "off")
                    callgrind("-d", f"{name}-{round_no}")
    finally:
        await app.shutdown()
    return {name: cpu[name] / (args.requests * args.rounds) * 1e6 for name in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per key per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        upstream_url = f"http://127.0.0.1:{port}"
        key, budgeted = asyncio.run(seed(work / "home", upstream_url))
        upstream = Pinned("1", uvicorn_cmd("bench.fake_upstream:app", port), dict(os.environ), work / "up.log")
        try:
            upstream.wait(f"{upstream_url}/v1/chat/completions")
            cpu = asyncio.run(run(args, work / "home", {"no_budget": key, "budget": budgeted}))
        finally:
            upstream.stop()
    report: dict[str, Any] = {"requests_per_key": args.requests * args.rounds, "concurrency": args.concurrency}
    if UNDER_VALGRIND:
        report["note"] = "instructions per request: python bench/budget_instructions.py --sum OUT_FILE REQUESTS_PER_KEY"
    else:
        report["cpu_us_per_request"] = {name: round(v, 1) for name, v in cpu.items()}
        report["added_cpu_us_per_request"] = round(cpu["budget"] - cpu["no_budget"], 1)
    print(json.dumps(report, indent=2))


def instructions(out_prefix: str, requests: int) -> dict[str, float]:
    """Instructions per request of each key from the callgrind dumps ``out_prefix``.* (see the docstring)."""
    totals: dict[str, int] = {}
    for path in Path(out_prefix).parent.glob(Path(out_prefix).name + "*"):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: dump (\w+)-\d+$", text, re.M)
        summary = re.search(r"^totals: (\d+)", text, re.M)
        if trigger and summary:
            totals[trigger.group(1)] = totals.get(trigger.group(1), 0) + int(summary.group(1))
    return {name: total / requests for name, total in totals.items()}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--sum":
        # python bench/budget_instructions.py --sum /tmp/kp.cg.1234 800
        found = instructions(sys.argv[2], int(sys.argv[3]))
        found["added"] = found.get("budget", 0) - found.get("no_budget", 0)
        print(json.dumps({k: round(v) for k, v in found.items()}, indent=2))
    else:
        main()
