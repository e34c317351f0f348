"""Instructions per proxied request (valgrind callgrind), which the machine's load does not change.

    python bench/gateway_callgrind.py /tmp/old --connections 8 --seconds 10
    python bench/gateway_callgrind.py .        --connections 8 --seconds 10

keyplane from the given source tree runs under callgrind with instrumentation off; it is switched on
(``callgrind_control -i on``) for one wrk run and the 2.5 s after it (the usage batch of those requests is
written), then the total instructions are divided by the requests wrk completed. All threads are counted
(the usage writer too); the kernel is not (a saved system call shows in CPU time, not here). Needs
valgrind and wrk. Several runs per tree: the idle loop's instructions are spread over fewer requests when
callgrind's slowdown lets fewer through.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="the keyplane source tree to measure")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, kp_port = free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        key, _ = asyncio.run(seed(work / "home", upstream_url))
        env = {**os.environ, "KEYPLANE_HOME": str(work / "home"), "PYTHONMALLOC": "malloc"}
        upstream = Pinned("1", uvicorn_cmd("bench.fake_upstream:app", up_port), env, work / "up.log")
        out = work / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
               sys.executable, *keyplane_cmd(kp_port, args.tree.resolve())]
        keyplane = Pinned("0", cmd, env, work / "kp.log", cwd=args.tree.resolve())
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
            headers = {"Authorization": f"Bearer {key}"}
            hp.CONNECTIONS = args.connections
            wrk(url, 5, headers, script)
            time.sleep(2)
            pid = str(keyplane.p.pid)
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
            sample = wrk(url, args.seconds, headers, script)
            time.sleep(2.5)
            subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
            time.sleep(1)
            total = 0
            for name in glob.glob(f"{out}.*"):
                for line in Path(name).read_text().splitlines():
                    if line.startswith(("summary:", "totals:")):
                        total = max(total, int(line.split()[1]))
            print(args.tree, "requests", sample["requests"], "non_2xx", sample["non_2xx"], "instructions", total,
                  "per request", total // max(sample["requests"], 1))
        finally:
            keyplane.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
