"""CORS for the MCP gateway at ``/mcp/{name}``: browser MCP clients (MCP Inspector, web agents) preflight.

Which browser origins may call is the rule ``/mcp`` already follows (``KEYPLANE_MCP_ALLOWED_ORIGINS``):
loopback on any port, the public URL, and the origins that setting adds (``http://name:*`` for any port).
An allowed origin gets a preflight answer and ``Access-Control-Allow-Origin`` on every answer, errors
included, so the browser lets the client read them. Any other origin gets no CORS header (the browser keeps
the answer from the page) and a preflight ``403 origin_not_allowed`` in the error shape. CORS is never an
authorization: every request still needs its key, which a browser never attaches on its own (no cookies,
so no ``Access-Control-Allow-Credentials``).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from keyplane.config import Settings
from keyplane.domain.errors import KeyplaneError
from keyplane.gateway.asgi import Send

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = (b"Authorization, Content-Type, Accept, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, "
                 b"Mcp-Method, Mcp-Name, X-API-Key, X-MCP-Signature, X-MCP-Timestamp")
EXPOSE_HEADERS = (b"Mcp-Session-Id, MCP-Protocol-Version, WWW-Authenticate, Retry-After, RateLimit-Limit, "
                  b"RateLimit-Remaining, RateLimit-Reset")
MAX_AGE = b"600"


class AllowedOrigins:
    """Exact origins plus ``scheme://host:*`` patterns (any port), compared case-insensitively."""

    def __init__(self, settings: Settings) -> None:
        exact: set[str] = set()
        any_port: set[str] = set()
        configured = [o.strip().rstrip("/") for o in settings.mcp_allowed_origins.split(",") if o.strip()]
        loopback = [f"{scheme}://{host}:*" for scheme in ("http", "https") for host in LOOPBACK_HOSTS]
        public = urlsplit(settings.base_url)
        if public.netloc:
            exact.add(f"{public.scheme}://{public.netloc}".lower())
        for origin in loopback + configured:
            origin = origin.lower()
            if origin.endswith(":*"):
                any_port.add(origin[:-2])
            else:
                exact.add(origin)
        self.exact = frozenset(exact)
        self.any_port = frozenset(any_port)
        self.everyone = "*" in exact

    def allows(self, origin: str) -> bool:
        origin = origin.lower()
        if self.everyone or origin in self.exact:
            return True
        base, colon, port = origin.rpartition(":")
        if colon and port.isdigit() and base in self.any_port:
            return True
        return origin in self.any_port  # the default port of a "host:*" pattern


def answer_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", EXPOSE_HEADERS),
            (b"vary", b"Origin")]


def with_cors(send: Send, origin: bytes) -> Send:
    """``send`` with the CORS answer headers added to the response start."""
    extra = answer_headers(origin)

    async def send_with_cors(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return send_with_cors


async def preflight(send: Send, origin_allowed: bool) -> KeyplaneError | None:
    """Answer an ``OPTIONS`` preflight (204; ``send`` adds the origin), or return the refusal of an origin."""
    if not origin_allowed:
        return KeyplaneError(403, "origin_not_allowed",
                             "This Origin may not call MCP servers through keyplane; add it to "
                             "KEYPLANE_MCP_ALLOWED_ORIGINS", headers={"Allow": "GET, POST, DELETE, OPTIONS"})
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-methods", ALLOW_METHODS), (b"access-control-allow-headers", ALLOW_HEADERS),
        (b"access-control-max-age", MAX_AGE), (b"allow", ALLOW_METHODS)]})
    await send({"type": "http.response.body", "body": b""})
    return None
