"""Real ``keyplane`` processes and real HTTP servers for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from keyplane.http_protocol import http_protocol

KEYPLANE = shutil.which("keyplane", path=str(Path(sys.executable).parent)) or "keyplane"


# Ports for test servers come from below Linux's ephemeral range (32768+), in a band of their own per
# xdist worker. A port from bind(0) is free only until it is released: another worker's server, or any
# outgoing connection, could take it before our server binds it, and a readiness check would then reach
# someone else's server (seen as a 401 on a loaded machine). Ports below the ephemeral range are never
# handed out by the kernel, and the bands keep the two workers apart.
_BAND = 4000
_BAND_START = 20000 + _BAND * (int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 3)
_port_offsets = itertools.count(random.randrange(_BAND))


def free_port() -> int:
    for _ in range(_BAND):
        port = _BAND_START + next(_port_offsets) % _BAND
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (another run on this machine, or a server of ours still up)
            return port
    raise RuntimeError(f"no free port in {_BAND_START}-{_BAND_START + _BAND - 1}")


def env_for(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPLANE_")}
    env.update(settings_env)
    return env


def cli(settings_env: dict[str, str], *args: str, check: bool = True, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([KEYPLANE, *args], env=env_for(settings_env), capture_output=True, text=True,
                            timeout=60, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"keyplane {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


class Server:
    """``keyplane serve`` in a subprocess; collects stdout and stderr for later inspection."""

    def __init__(self, settings_env: dict[str, str], cwd: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [KEYPLANE, "serve", "--port", str(self.port), *args],
            env=env_for(settings_env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{''.join(self.stderr)}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"server did not become ready in {timeout} s:\n{self.logs[-3000:]}")
        # The banner is written before the server listens, but the reader threads may lag on a loaded
        # machine: wait for it (tests read it), though never fail here (those that need it say so).
        banner_deadline = time.monotonic() + 15
        while not self._banner_read() and time.monotonic() < banner_deadline:
            time.sleep(0.05)

    def _banner_read(self) -> bool:
        """The start-up banner (written before the server listens) has been read whole from the pipe: the
        line that opens it and the blank line that closes it. The reader threads may lag on a loaded machine."""
        lines = list(self.stdout)
        opened = next((i for i, line in enumerate(lines) if "keyplane is running at" in line), None)
        return opened is not None and any(not line.strip() for line in lines[opened + 1:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.stdout)

    @property
    def logs(self) -> str:
        return "".join(self.stderr)


@contextlib.asynccontextmanager
async def serve(asgi_app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Serve an ASGI app over real HTTP on loopback, in this event loop, with the HTTP protocol
    ``keyplane serve`` runs (keyplane/http_protocol.py)."""
    port = port or free_port()
    config = uvicorn.Config(asgi_app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                            http=http_protocol(), access_log=False,
                            timeout_graceful_shutdown=1)  # a test's hung request must not stall it
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # uvicorn offers no event for "started"
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
