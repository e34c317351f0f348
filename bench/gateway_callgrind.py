"""Instructions per proxied request (valgrind callgrind), which the machine's load does not change.

    python bench/gateway_callgrind.py /tmp/old --connections 8 --seconds 10
    python bench/gateway_callgrind.py .        --connections 8 --seconds 10
    python bench/gateway_callgrind.py .        --budget             # the key with a budget (issue 17)
    python bench/gateway_callgrind.py .        --paired --rounds 3  # both keys, alternating, one process

keyplane from the given source tree runs under callgrind with instrumentation off; it is switched on
(``callgrind_control -i on``) for one wrk run and the 2.5 s after it (the usage batch of those requests is
written), then the total instructions are divided by the requests wrk completed. "Without the idle rate":
the instructions the same time costs idle (measured once first: the background jobs' timers, ~2M per
second) are deducted before dividing, else callgrind's slowdown spreads them over however few requests got
through on a loaded machine (±15% per request). All threads are counted (the usage writer too); the kernel
is not (a saved system call shows in CPU time, not here). Several runs per tree.

``--budget``: the key whose limit profile sets a token, daily and monthly limit never reached
(bench/gateway.py's ``seed``), so every request reserves, is clamped and settles in three windows.
``--paired``: the key without and the key with a budget in one process, alternating (A B, B A …), each
sample its own dump (a dump zeroes the counters), and the budget's added instructions per request per round.
Needs valgrind and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.hotpath as hp  # noqa: E402
from bench.gateway import BODY, Pinned, keyplane_cmd, seed, uvicorn_cmd  # noqa: E402
from bench.hotpath import free_port, lua_post, wrk  # noqa: E402


def dumped_total(paths: list[str]) -> int:
    """The instructions one callgrind dump counted (all threads: one file)."""
    total = 0
    for name in paths:
        for line in Path(name).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="the keyplane source tree to measure")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--budget", action="store_true", help="the key with a budget (never reached)")
    parser.add_argument("--paired", action="store_true",
                        help="the key without and the key with a budget, alternating in one process")
    parser.add_argument("--rounds", type=int, default=1, help="samples per key (pairs with --paired)")
    parser.add_argument("--pymalloc", action="store_true",
                        help="Python's own allocator, as keyplane serve runs (default: PYTHONMALLOC=malloc, glibc's, "
                             "which costs ~2x per allocation: figures comparable with earlier runs)")
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here (callgrind_annotate them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, kp_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        key, budgeted = asyncio.run(seed(work / "home", upstream_url))
        env = {**os.environ, "KEYPLANE_HOME": str(work / "home")}
        if not args.pymalloc:
            env["PYTHONMALLOC"] = "malloc"
        upstream = Pinned("1", uvicorn_cmd("bench.fake_upstream:app", up_port), env, work / "up.log")
        out = work / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
               sys.executable, *keyplane_cmd(kp_port, args.tree.resolve())]
        keyplane = Pinned("0", cmd, env, work / "kp.log", cwd=args.tree.resolve())
        keys = {"no_budget": key, "budget": budgeted}
        names = ["no_budget", "budget"] if args.paired else ["budget" if args.budget else "no_budget"]
        try:
            upstream.wait(f"{upstream_url}/v1/chat/completions")
            for _ in range(600):  # startup under valgrind takes a while
                try:
                    httpx.get(f"http://127.0.0.1:{kp_port}/healthz", timeout=5)
                    break
                except httpx.HTTPError:
                    time.sleep(1)
            script = lua_post(work / "chat.lua", BODY)
            url = f"http://127.0.0.1:{kp_port}/v1/chat/completions"
            hp.CONNECTIONS = args.connections
            for name in names:  # warm: each key loaded, its buckets seeded, the code paths run
                wrk(url, 5, {"Authorization": f"Bearer {keys[name]}"}, script)
            time.sleep(2)
            pid = str(keyplane.p.pid)
            seen: set[str] = set()
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
            began = time.monotonic()
            time.sleep(args.seconds + 2.5)  # idle: what the loop, the timers and the background jobs cost
            subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
            idle_seconds = time.monotonic() - began
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
            time.sleep(1)
            seen.update(glob.glob(f"{out}.*"))
            idle_rate = dumped_total(list(seen)) / idle_seconds
            print(args.tree, f"idle: {idle_rate:,.0f} instructions per second", flush=True)
            per: dict[str, list[int]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
                    began = time.monotonic()
                    sample = wrk(url, args.seconds, {"Authorization": f"Bearer {keys[name]}"}, script)
                    time.sleep(2.5)  # the usage writer's batch of these requests is written (and counted)
                    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
                    elapsed = time.monotonic() - began
                    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
                    time.sleep(1)
                    new = sorted(set(glob.glob(f"{out}.*")) - seen)
                    seen.update(new)
                    total = dumped_total(new)
                    done = max(sample["requests"], 1)
                    per[name].append(round((total - idle_rate * elapsed) / done))
                    print(args.tree, name, "requests", sample["requests"], "non_2xx", sample["non_2xx"],
                          "instructions", total, "per request", total // done, "without the idle rate",
                          per[name][-1], flush=True)
            if args.paired:
                added = [b - a for a, b in zip(per["no_budget"], per["budget"], strict=True)]
                print(args.tree, "budget added per request, each round:", added,
                      "median", sorted(added)[len(added) // 2])
        finally:
            keyplane.stop()
            upstream.stop()
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for name in glob.glob(f"{out}.*"):
                    shutil.copy(name, args.keep)


if __name__ == "__main__":
    main()
