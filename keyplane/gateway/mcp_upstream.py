"""Where /mcp/{name} forwards: an upstream MCP server behind one small interface.

    McpUpstream (Protocol)          open(route, method, headers, body) -> UpstreamAnswer
      └─ HttpUpstream               Streamable HTTP over the gateway's pooled client (gateway/http_client.py)

An answer exposes its status, headers and body as chunks as they arrive: nothing here reads a stream whole.
Failures become keyplane errors: unreachable 502 ``upstream_error``, no answer in time 504 ``upstream_timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson

from keyplane.domain.errors import KeyplaneError
from keyplane.gateway.http_client import BodyTooLarge, HttpClient, HttpClientError, Response
from keyplane.services.mcp_servers import McpRoute

PROBE_PROTOCOL_VERSION = "2025-06-18"


class UpstreamAnswer(Protocol):
    status: int
    headers: dict[str, str]  # lower-case names

    def chunks(self) -> AsyncIterator[bytes]: ...
    async def read(self, limit: int) -> bytes: ...
    def close(self) -> None: ...


class McpUpstream(Protocol):
    async def open(self, route: McpRoute, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer: ...
    async def close(self) -> None: ...


def mask(text: str, route: McpRoute) -> str:
    """Upstream text with the server's own credentials blanked out (an upstream may echo them)."""
    for secret in route.secrets():
        text = text.replace(secret, "…")
    return text


class _HttpAnswer:
    def __init__(self, response: Response, route: McpRoute) -> None:
        self.response = response
        self.route = route
        self.status = response.status
        self.headers = response.headers  # lower-case names already

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.chunks()

    async def read(self, limit: int) -> bytes:
        """The whole (JSON) body, bounded in size and in time."""
        try:
            async with asyncio.timeout(self.route.timeout):
                return await self.response.read(limit)
        except TimeoutError:
            raise KeyplaneError(504, "upstream_timeout", f"MCP server '{self.route.name}' did not finish its answer "
                                                         f"within {self.route.timeout:g} s") from None
        except BodyTooLarge:
            raise KeyplaneError(502, "upstream_error", f"MCP server '{self.route.name}' answered with more than "
                                                       f"{limit} bytes") from None
        except HttpClientError as exc:
            raise KeyplaneError(502, "upstream_error", f"MCP server '{self.route.name}' broke the connection: "
                                                       f"{type(exc).__name__}") from None

    def close(self) -> None:
        # Read whole: the connection went back to the pool already; mid-answer: drop the connection, so the
        # upstream sees the cancellation.
        self.response.close()


class HttpUpstream:
    """One pooled client for every upstream MCP server (connections kept alive and reused)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._client: HttpClient | None = None

    def client(self) -> HttpClient:
        if self._client is None:
            self._client = HttpClient(max_connections=self.max_connections)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def open(self, route: McpRoute, method: str, headers: dict[str, str], body: bytes) -> UpstreamAnswer:
        """Send the request; return once the upstream's status and headers are in (within the server's timeout)."""
        for name, value in route.headers:
            headers[name] = value
        try:
            async with asyncio.timeout(route.timeout):
                response = await self.client().request(method, route.url, headers, body or None,
                                                       connect_timeout=route.timeout)
        except TimeoutError:
            raise KeyplaneError(504, "upstream_timeout",
                                f"MCP server '{route.name}' did not answer within {route.timeout:g} s") from None
        except HttpClientError as exc:
            raise KeyplaneError(502, "upstream_error",
                                f"Could not reach MCP server '{route.name}': {exc}") from None
        return _HttpAnswer(response, route)


def _first_message(body: bytes, content_type: str) -> Any:
    """The JSON-RPC message of a JSON answer, or the first one with an id in an SSE answer."""
    if content_type.startswith("text/event-stream"):
        for line in body.replace(b"\r\n", b"\n").split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    message = orjson.loads(line[5:].strip())
                except orjson.JSONDecodeError:
                    continue
                if isinstance(message, dict) and "id" in message and "method" not in message:
                    return message
        return None
    return orjson.loads(body) if body else None


async def probe(upstream: McpUpstream, route: McpRoute) -> dict[str, Any]:
    """Reachability and tool list: initialize, tools/list, end the session. Never raises for the upstream's faults."""
    base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    session_id: str | None = None

    async def call(method: str, params: dict[str, Any], ident: int | None) -> Any:
        nonlocal session_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
        if ident is not None:
            message["id"] = ident
        headers = dict(base)
        if session_id:
            headers["mcp-session-id"] = session_id
            headers["mcp-protocol-version"] = PROBE_PROTOCOL_VERSION
        answer = await upstream.open(route, "POST", headers, orjson.dumps(message))
        try:
            session_id = answer.headers.get("mcp-session-id", session_id)
            body = await answer.read(4 * 1024 * 1024)
        finally:
            answer.close()
        if answer.status >= 400:
            raise KeyplaneError(502, "upstream_error", f"answered HTTP {answer.status} to {method}: "
                                                       f"{mask(body[:300].decode('utf-8', 'replace'), route)}")
        if ident is None:
            return None
        reply = _first_message(body, answer.headers.get("content-type", ""))
        if not isinstance(reply, dict) or "result" not in reply:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise KeyplaneError(502, "upstream_error", f"{method} failed: {mask(str(error)[:300], route)}")
        return reply["result"]

    try:
        init = await call("initialize", {"protocolVersion": PROBE_PROTOCOL_VERSION, "capabilities": {},
                                         "clientInfo": {"name": "keyplane-health", "version": "1"}}, 1)
        await call("notifications/initialized", {}, None)
        tools = await call("tools/list", {}, 2)
        names = sorted(t.get("name", "") for t in tools.get("tools", []) if isinstance(t, dict))
        report: dict[str, Any] = {"reachable": True, "error": None, "protocol_version": init.get("protocolVersion"),
                                  "server_info": init.get("serverInfo"), "tools": names}
    except KeyplaneError as exc:
        return {"reachable": False, "error": mask(exc.message, route), "tools": []}
    except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
        return {"reachable": False, "error": f"not an MCP answer: {type(exc).__name__}", "tools": []}
    if session_id:
        try:
            answer = await upstream.open(route, "DELETE", {"mcp-session-id": session_id}, b"")
            answer.close()
        except KeyplaneError:
            pass
    return report
