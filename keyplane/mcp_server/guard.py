"""A thin raw-ASGI layer in front of the MCP SDK: who is calling, and may they call this tool.

The SDK's own auth middleware checks only server-wide scopes and would advertise OAuth discovery,
which makes Claude Code and Cursor ignore a configured header. So this layer answers 401/403 in
keyplane's error shape itself, reads the JSON-RPC method and tool name from the body (the SDK
checks that a 2026-07-28 ``Mcp-Name`` header matches it), and hands the authenticated principal
to the tools through the ASGI scope's ``state``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pydantic_core

from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError, missing_bearer
from keyplane.gateway.asgi import BodyTooLarge, Receive, Scope, Send, bearer, read_body, send_error
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal

log = logging.getLogger("keyplane.mcp")

PRINCIPAL_STATE_KEY = "keyplane.principal"
MAX_MCP_BODY_BYTES = 4 * 1024 * 1024  # the SDK's own default limit


def principal_of(request: Any) -> Principal | None:
    """The principal the guard authenticated for the HTTP request an MCP message came in (None: not guarded)."""
    principal = getattr(request, "scope", {}).get("state", {}).get(PRINCIPAL_STATE_KEY)
    return principal if isinstance(principal, Principal) else None


@dataclass(frozen=True, slots=True)
class Needed:
    """One scope a request needs, and the tool call (name, arguments) that needs it, if any."""

    scope: str
    tool: str | None = None
    arguments: Any = None


def parse_body(body: bytes) -> Any:
    """The body read exactly as the SDK reads it (``pydantic_core.from_json``: NaN, Infinity and all),
    so no message can mean one thing to this guard and another to the SDK behind it. What this cannot
    read, the SDK cannot either: it answers with a JSON-RPC parse error and calls no tool."""
    try:
        return pydantic_core.from_json(body) if body else None
    except ValueError:
        return None


def required_scopes(payload: Any) -> list[Needed]:
    """Scopes a JSON-RPC message (or a batch of them) needs: only tools/call is scoped per tool.

    Unknown tools need nothing here: the SDK answers them with a clear "unknown tool" error.
    """
    messages = payload if isinstance(payload, list) else [payload]
    needed: list[Needed] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("method") != "tools/call":
            continue
        params = message.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if isinstance(name, str) and name in scope_rules.MCP_TOOL_SCOPES:
            assert isinstance(params, dict)
            needed.append(Needed(scope_rules.MCP_TOOL_SCOPES[name], name, params.get("arguments")))
    return needed


class McpGuard:
    def __init__(self, kp: Keyplane, inner: Any) -> None:
        self.kp = kp
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            token = self._token(scope)
            principal = await self.kp.authenticate_service_account(token, self.kp.client_address.of(scope))
            body: bytes | None = None
            if scope["method"] == "POST":
                body = await read_body(receive, MAX_MCP_BODY_BYTES, scope)
                for needed in self._scopes_for(scope, body):
                    try:
                        principal.require(needed.scope)
                    except KeyplaneError as refused:
                        if needed.tool is not None:  # a refused tool call is audited too, with why
                            self.kp.tool_calls.record(principal, needed.tool, known=True, arguments=needed.arguments,
                                                      outcome="refused", reason=f"{refused.code}: {refused.message}")
                        raise
        except BodyTooLarge:
            await send_error(send, KeyplaneError(413, "request_too_large",
                                                 f"An MCP message is limited to {MAX_MCP_BODY_BYTES} bytes"))
            return
        except KeyplaneError as exc:
            await send_error(send, exc)
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = principal
        await self.inner(scope, _replay(body, receive) if body is not None else receive, send)

    def _token(self, scope: Scope) -> str | None:
        token = bearer(scope)
        query = scope.get("query_string", b"")
        if b"api_key=" not in query:
            return token
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        from_query = next((v for k, v in pairs if k == "api_key"), None)
        # Never pass the token on in the URL: nothing downstream (the SDK, a log line) may see it.
        scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "api_key"]).encode("latin-1")
        if token is not None:
            return token
        if not self.kp.settings.mcp_query_token:
            raise missing_bearer("A token in the URL (?api_key=) is turned off on this server: send "
                                 "'Authorization: Bearer <token>', or set KEYPLANE_MCP_QUERY_TOKEN=true")
        if from_query:
            scope["headers"] = [*scope["headers"], (b"authorization", b"Bearer " + from_query.encode("latin-1"))]
        return from_query or None

    @staticmethod
    def _scopes_for(scope: Scope, body: bytes) -> list[Needed]:
        needed = required_scopes(parse_body(body))
        for key, value in scope["headers"]:
            if key == b"mcp-name" and value.decode("latin-1") in scope_rules.MCP_TOOL_SCOPES:
                needed.append(Needed(scope_rules.MCP_TOOL_SCOPES[value.decode("latin-1")]))
        return needed


def _replay(body: bytes, receive: Receive) -> Receive:
    """Give the SDK the body this layer already read, then the real stream (for a disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # type: ignore[return-value]

    return replay

