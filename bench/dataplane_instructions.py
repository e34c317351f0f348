"""Instructions per proxied request, client, keyplane and upstream in one process (valgrind callgrind).

    .venv/bin/python bench/dataplane_instructions.py /tmp/old
    .venv/bin/python bench/dataplane_instructions.py .

keyplane from the given source tree (``KeyplaneApp`` behind its own httptools protocol, as ``keyplane serve``
runs it, on uvloop) answers ``POST /v1/chat/completions`` from ``--connections`` keep-alive connections of a
minimal client, forwarding to a minimal upstream; both are raw asyncio protocols in the same process, the
same code for every tree. The script runs itself under callgrind; the instrumentation is on for
``--requests`` requests after a warm-up, and the total (all threads: the usage writer too) is divided by
them. Unlike ``bench/gateway_callgrind.py`` nothing here waits on another process and the jobs that run by
the clock are stopped (the change poll; the usage writer's and access log's batch writes: what a request
adds to a batch is counted, the write is not), so the figure moves little from run to run, whatever the
machine's load: what it is for is telling small cuts on the event loop's path apart. What it
does not count: the kernel (a saved system call shows in CPU time only), and the client's and upstream's
own instructions are in it, the same for every tree.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UNDER_VALGRIND = any("vgpreload" in line for line in Path("/proc/self/maps").read_text().splitlines())
_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


class Upstream(asyncio.Protocol):
    """Answers every request (Content-Length bodies only) with bench/fake_upstream.py's chat completion."""

    answer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _LENGTH.search(self.buffer, 0, end)
            size = end + 4 + (int(match.group(1)) if match else 0)
            if len(self.buffer) < size:
                return
            self.buffer = self.buffer[size:]
            self.transport.write(self.answer)


class Client(asyncio.Protocol):
    """One keep-alive connection sending the same request, the next once an answer is whole."""

    def __init__(self, request: bytes, left: list[int], done: asyncio.Future[None]) -> None:
        """``left``: [requests still to send, answers still to come]."""
        self.request, self.left, self.done = request, left, done
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.buffer.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"keyplane answered: {self.buffer[:400]!r}")
        match = _LENGTH.search(self.buffer, 0, end)
        assert match is not None
        if len(self.buffer) < end + 4 + int(match.group(1)):
            return
        self.buffer = b""
        self.left[1] -= 1
        if self.left[0] > 0:
            self.left[0] -= 1
            self.transport.write(self.request)
        elif self.left[1] == 0:
            self.done.set_result(None)


def instrument(*args: str) -> None:
    if UNDER_VALGRIND:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


async def measure(tree: Path, home: Path, connections: int, requests: int) -> None:
    import orjson
    import uvicorn
    from uvicorn.server import ServerState

    from bench.fake_upstream import ANSWER
    from bench.gateway import BODY, seed
    from keyplane import http_protocol
    from keyplane.app import KeyplaneApp
    from keyplane.config import Settings

    loop = asyncio.get_running_loop()
    Upstream.answer = (b"HTTP/1.1 200 OK\r\ndate: Tue, 24 Nov 2026 07:00:00 GMT\r\ncontent-type: application/json"
                       b"\r\ncontent-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
    upstream = await loop.create_server(Upstream, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    key, _ = await seed(home, f"http://127.0.0.1:{up_port}")

    app = KeyplaneApp(Settings(home=home), owns_process=True)
    await app.startup()
    # The jobs that run by the clock, not by the request (the change poll, a store query a second; the usage
    # and access-log batches), stopped: under valgrind their count follows the run's wall time, which the
    # machine's load sets. What each request adds to their batches is still counted; the shutdown writes them.
    for task in app.kp._tasks:
        task.cancel()
    protocol = http_protocol.http_protocol()
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, access_log=False,
                            proxy_headers=False, server_header=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Tue, 24 Nov 2026 07:00:00 GMT")]
    server = await loop.create_server(lambda: protocol(config=config, server_state=state, app_state={},
                                                       _loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = orjson.dumps(BODY)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (port, key.encode(), len(body), body))

    async def run(n: int) -> None:
        left, done = [n - connections, n], loop.create_future()
        transports = [(await loop.create_connection(lambda: Client(request, left, done), "127.0.0.1", port))[0]
                      for _ in range(connections)]
        await done
        for transport in transports:
            transport.close()

    await run(max(200, requests // 5))
    instrument("-i", "on")
    await run(requests)
    instrument("-i", "off")
    instrument("-d")
    server.close()
    upstream.close()
    await app.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path, help="the keyplane source tree to measure")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if UNDER_VALGRIND:
        sys.path[:0] = [str(args.tree.resolve()), str(ROOT)]
        import uvloop

        import keyplane

        assert Path(keyplane.__file__).resolve().is_relative_to(args.tree.resolve()), keyplane.__file__

        with tempfile.TemporaryDirectory() as tmp:
            uvloop.run(measure(args.tree, Path(tmp) / "home", args.connections, args.requests))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONMALLOC": "malloc", "PYTHONHASHSEED": "0"}
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                        sys.executable, __file__, str(args.tree), "--connections", str(args.connections),
                        "--requests", str(args.requests)], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=(Path(tmp) / "log").open("w"))
        total = 0
        for name in Path(tmp).glob("callgrind.out.*"):
            for line in name.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        print(args.tree, "requests", args.requests, "instructions", total, "per request", total // args.requests)


if __name__ == "__main__":
    main()
