"""A real MCP server built with the official Python SDK, served over real HTTP in a thread of its own, for
the MCP gateway's tests: tools (with per-tool scopes), resources, prompts, a tool that streams progress, one
that asks for elicitation, a slow one, and one that reports the headers it received."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

from tests.processes import free_port

UPSTREAM_TOKEN = "upstream-credential-7f3a9c1e5b"


class Confirm(BaseModel):
    confirmed: bool


class Upstream:
    """What the server saw: every request's headers, and the slow tool's start/cancel events."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.refused = 0
        self.slow_started = threading.Event()
        self.slow_cancelled = threading.Event()
        self.disconnected = threading.Event()
        self.gate = threading.Event()
        self.url = ""


def build(state: Upstream) -> MCPServer:
    server = MCPServer("files-upstream")

    @server.tool()
    def read_file(path: str) -> str:
        """Read a file."""
        return f"contents of {path}"

    @server.tool()
    def read_dir(path: str) -> list[str]:
        """List a directory."""
        return [f"{path}/a", f"{path}/b"]

    @server.tool()
    def write_file(path: str, text: str) -> str:
        """Write a file."""
        return f"wrote {len(text)} bytes to {path}"

    @server.tool()
    def echo(text: str) -> str:
        """Echo."""
        return text

    @server.tool()
    async def count(steps: int, ctx: Context) -> str:
        """Streams progress while it counts."""
        for i in range(steps):
            await ctx.report_progress(i + 1, steps, f"step {i + 1}")
            await asyncio.sleep(0.02)
        return f"counted {steps}"

    @server.tool()
    async def confirm_delete(path: str, ctx: Context) -> str:
        """Asks the user before deleting."""
        answer = await ctx.elicit(f"Delete {path}?", Confirm)
        if answer.action == "accept" and answer.data.confirmed:
            return f"deleted {path}"
        return "kept"

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleeps (for cancellation and timeouts)."""
        state.slow_started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            state.slow_cancelled.set()
            raise
        return "done"

    @server.tool()
    def leaky_headers(ctx: Context) -> dict[str, str]:
        """A careless upstream: echoes every header it received, its own credential included."""
        return dict(ctx.headers or {})

    @server.tool()
    def seen_headers(ctx: Context) -> dict[str, str]:
        """The HTTP headers of this request as the upstream received them (its own credential left out)."""
        return {k: v for k, v in (ctx.headers or {}).items() if k.lower() != "authorization"}

    @server.tool()
    async def gated(ctx: Context) -> str:
        """Reports progress, then waits until the test opens the gate: proves events are relayed as they come."""
        await ctx.report_progress(1, 2, "waiting at the gate")
        for _ in range(1000):
            if state.gate.is_set():
                break
            await asyncio.sleep(0.01)
        return "through the gate"

    @server.resource("file:///readme", name="readme", mime_type="text/plain")
    def readme() -> str:
        return "the readme"

    @server.resource("file:///docs/{name}", name="doc")
    def doc(name: str) -> str:
        return f"doc {name}"

    @server.prompt()
    def review(code: str) -> str:
        """Review some code."""
        return f"Please review: {code}"

    return server


class _Guard:
    """The upstream's own credential check, and a record of every request's headers."""

    def __init__(self, app: Any, state: Upstream) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.state.headers.append(headers)
            if headers.get("authorization") != f"Bearer {UPSTREAM_TOKEN}":
                self.state.refused += 1
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"upstream says no"})
                return

            # Read the body here, then watch the connection for the whole request: a JSON-answer server never
            # asks again, and the test must see the gateway drop the connection whatever the app does.
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            gone = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.state.disconnected.set()
                gone.set()

            replayed = False

            async def app_receive() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            watcher = asyncio.create_task(watch())
            try:
                await self.app(scope, app_receive, send)
            finally:
                watcher.cancel()
            return
        await self.app(scope, receive, send)


@contextmanager
def running(*, json_response: bool = False) -> Iterator[Upstream]:
    """Serve the upstream on loopback in a thread with its own event loop (shared by a module's tests)."""
    state = Upstream()
    server = build(state)
    app = server.streamable_http_app(streamable_http_path="/mcp", json_response=json_response)
    port = free_port()
    config = uvicorn.Config(_Guard(app, state), host="127.0.0.1", port=port, lifespan="on", log_config=None,
                            access_log=False, timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline:
            raise AssertionError("the upstream MCP server did not start")
        time.sleep(0.02)
    state.url = f"http://127.0.0.1:{port}/mcp"
    try:
        yield state
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
