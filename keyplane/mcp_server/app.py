"""/mcp on keyplane's own port: the guard, then the SDK's Streamable HTTP app, with its session manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

from mcp.server.transport_security import TransportSecuritySettings

from keyplane.config import Settings
from keyplane.gateway.asgi import Receive, Scope, Send
from keyplane.mcp_server.guard import McpGuard
from keyplane.mcp_server.shaped import in_error_shape
from keyplane.mcp_server.tools import ToolMetrics, build_mcp_server
from keyplane.services.container import Keyplane

MCP_PATH = "/mcp"

# sse-starlette logs every response chunk at DEBUG, and an MCP answer may carry a one-time secret (a new key):
# never below INFO, whatever level the rest of the process logs at.
logging.getLogger("sse_starlette").setLevel(logging.INFO)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """Host and Origin checks against DNS rebinding: loopback, the public URL, and what settings add."""
    extra_hosts = [h.strip() for h in settings.mcp_allowed_hosts.split(",") if h.strip()]
    if "*" in extra_hosts:
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = [f"{h}:*" for h in LOOPBACK_HOSTS] + list(LOOPBACK_HOSTS) + extra_hosts
    origins = [f"http://{h}:*" for h in LOOPBACK_HOSTS] + [f"https://{h}:*" for h in LOOPBACK_HOSTS]
    origins += [o.strip().rstrip("/") for o in settings.mcp_allowed_origins.split(",") if o.strip()]
    public = urlsplit(settings.base_url)
    if public.netloc:
        hosts.append(public.netloc)
        origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)


class McpEndpoint:
    """Everything at /mcp. The SDK's session manager runs in a task of its own between startup and shutdown."""

    def __init__(self, kp: Keyplane, stateless: bool) -> None:
        self.metrics = ToolMetrics()
        self.server = build_mcp_server(kp, self.metrics)
        sdk_app = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH, stateless_http=stateless,
            transport_security=transport_security(kp.settings),
        )
        self.guard = McpGuard(kp, sdk_app)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != MCP_PATH:
            scope = dict(scope, path=MCP_PATH, raw_path=MCP_PATH.encode())  # "/mcp/" is the same endpoint
        await self.guard(scope, receive, in_error_shape(send))

    async def start(self) -> None:
        ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(ready, self._stop), name="mcp-sessions")
        await ready.wait()

    async def _run(self, ready: asyncio.Event, stop: asyncio.Event) -> None:
        # Entered and left in one task: the SDK's manager holds an anyio task group.
        async with self.server.session_manager.run():
            ready.set()
            await stop.wait()

    async def stop(self) -> None:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
            self._task = None

    def tool_calls(self) -> dict[tuple[str, str], int]:
        return dict(self.metrics.calls)

