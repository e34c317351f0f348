"""The ASGI entry point: hot-path routes first, raw; everything else to the FastAPI control plane."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path

from keyplane import served_url
from keyplane.api.app import build_api
from keyplane.api.edge import url_refusal
from keyplane.config import Settings
from keyplane.dashboard.app import Dashboard
from keyplane.domain.errors import KeyplaneError
from keyplane.gateway import demo
from keyplane.gateway.asgi import Receive, Scope, Send, send_error
from keyplane.gateway.dataplane import DataPlane
from keyplane.gateway.enforce import Enforcer
from keyplane.gateway.mcp_gateway import PREFIX as MCP_GATEWAY_PREFIX
from keyplane.gateway.mcp_gateway import McpGateway
from keyplane.gateway.mcp_stdio import RoutedUpstream, StdioUpstream
from keyplane.gateway.mcp_upstream import HttpUpstream
from keyplane.gateway.metrics import CONTENT_TYPE, Metrics
from keyplane.gateway.proxy import Upstream
from keyplane.gateway.verify import VERIFY_PATH, VerifyEndpoint
from keyplane.mcp_server.app import MCP_PATH, McpEndpoint
from keyplane.services.container import Bootstrap, Keyplane
from keyplane.store.reachability import store_problem

log = logging.getLogger("keyplane")
FAVICON = Path(__file__).parent / "dashboard" / "static" / "favicon.svg"


class KeyplaneApp:
    """A dispatcher, not a framework: a dict lookup sends hot paths to raw ASGI handlers."""

    def __init__(self, settings: Settings | None = None, on_ready: Callable[[Bootstrap], None] | None = None,
                 *, owns_process: bool = False) -> None:
        self.settings = settings or Settings()
        self.owns_process = owns_process  # the app is what this process is for (serve, an ASGI server)
        self.kp = Keyplane(self.settings)
        self.api = build_api(self.kp)
        self.metrics = Metrics(self.kp)
        self.enforcer = Enforcer(self.kp)
        self.upstream = Upstream(self.kp)
        self.dataplane = DataPlane(self.kp, self.enforcer, self.metrics, self.upstream)
        # /mcp/{name}: the same enforcement as /v1/*, forwarding to the registered upstream MCP server.
        # An HTTP server is forwarded to; a stdio server is a process per client session (gateway/mcp_stdio.py).
        self.mcp_upstream = RoutedUpstream(HttpUpstream(self.settings.upstream_max_connections),
                                           StdioUpstream(self.settings))
        # A stdio server disabled, deleted or changed (here or in another process) stops its processes at once.
        self.mcp_upstream.stdio.lookup = self.kp.mcp_route_for
        self.kp.invalidator.on_mcp_routes_dropped.append(self.mcp_upstream.stdio.routes_changed)
        self.mcp_gateway = McpGateway(self.kp, self.enforcer, self.metrics, self.mcp_upstream)
        self.kp.mcp_servers.probe = self.mcp_upstream.probe
        self.hot_routes = {
            VERIFY_PATH: VerifyEndpoint(self.kp, self.enforcer, self.metrics),
            "/metrics": self.serve_metrics,
            "/": self.to_dashboard,
            "/favicon.ico": self.favicon,
        }
        self.mcp: McpEndpoint | None = None
        if self.settings.mcp_enabled:
            self.mcp = McpEndpoint(self.kp, stateless=self.settings.mcp_sessions_stateless)
            self.hot_routes[MCP_PATH] = self.mcp
            self.hot_routes[MCP_PATH + "/"] = self.mcp
            self.metrics.watch_mcp(self.mcp)
        self.dashboard = Dashboard(self.kp)
        self.on_ready = on_ready
        self.bootstrap: Bootstrap | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            # the data plane first: no hot route is under /v1/
            handler = self.dataplane if path.startswith("/v1/") else self.hot_routes.get(path)
            if handler is None:
                if path.startswith(MCP_GATEWAY_PREFIX):
                    handler = self.mcp_gateway
                elif self.settings.demo and path.startswith(demo.DEMO_PREFIX):
                    handler = demo.echo_app
                elif (refusal := url_refusal(scope)) is not None:
                    await send_error(send, refusal)
                    return
                elif path == "/ui" or path.startswith("/ui/"):
                    await self.dashboard(scope, receive, send)
                    return
            if handler is not None:
                try:
                    await handler(scope, receive, send)
                except Exception as exc:  # never a stack trace or a secret to the client
                    log.error("unhandled error on %s: %s", scope["path"], type(exc).__name__, exc_info=exc)
                    await send_error(send, KeyplaneError(500, "internal_error", "An internal error occurred"))
                return
            await self.api(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def to_dashboard(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A browser pointed at the bare address lands on the dashboard (the API lives under /api, /v1, /mcp)."""
        await send({"type": "http.response.start", "status": 307,
                    "headers": [(b"location", b"/ui"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def favicon(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = FAVICON.read_bytes()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"image/svg+xml"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"public, max-age=86400")]})
        await send({"type": "http.response.body", "body": body})

    async def serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.metrics.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def startup(self) -> Bootstrap:
        self.bootstrap = await self.kp.start()
        if self.mcp is not None:
            await self.mcp.start()
        if self.settings.demo:
            await demo.register(self.kp)
        else:
            await demo.unregister(self.kp)
        if self.owns_process:
            served_url.record(self.settings)  # what `keyplane connect` prints, port and all
            # Everything built so far (frameworks, SDKs, settings, templates) lives as long as the process:
            # take it out of the garbage collector's view, so full collections stop scanning it under load
            # (measured: p99 of /v1/models at 64 connections roughly halved).
            gc.collect()
            gc.freeze()
        if self.on_ready is not None:
            self.on_ready(self.bootstrap)
        return self.bootstrap

    async def shutdown(self) -> None:
        if self.owns_process:
            gc.unfreeze()
        if self.mcp is not None:
            await self.mcp.stop()
        await self.upstream.close()
        await self.mcp_upstream.close()
        await self.kp.stop()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    problem = store_problem(self.settings.effective_database_url, exc)
                    if problem is not None:  # a setting to fix, not a bug: one line, no traceback
                        log.error("startup failed: %s", problem)
                    else:
                        log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed",
                                "message": problem or f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


def create_app() -> KeyplaneApp:
    """Factory for ASGI servers (``uvicorn --factory keyplane.app:create_app``, and each ``--workers`` process).

    A worker is a fresh interpreter: logging is configured here too, before uvicorn's first line, so every
    process writes the same JSON lines as ``keyplane serve`` with one worker.
    """
    from keyplane.config import load_or_exit
    from keyplane.logs import configure_logging

    settings = load_or_exit()
    configure_logging(settings.log_level)
    return KeyplaneApp(settings, owns_process=True)
