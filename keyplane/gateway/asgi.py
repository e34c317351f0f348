"""Raw ASGI helpers for the hot path: no framework, no dependency injection, no middleware."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

import orjson

from keyplane.domain.errors import KeyplaneError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a (lower-case) request header."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def bearer(scope: Scope) -> str | None:
    """``Authorization: Bearer …``, or the ``x-api-key`` header Anthropic-style clients send."""
    return credentials(scope)[0]


def credentials(scope: Scope) -> tuple[str | None, str | None]:
    """``bearer(scope)`` and ``header(scope, b"x-mcp-signature")``, in one pass over the headers."""
    auth = None
    api_key = None
    signature = None
    for key, value in scope["headers"]:
        if key == b"authorization":
            auth = value
        elif key == b"x-api-key":
            api_key = value
        elif key == b"x-mcp-signature" and signature is None:
            signature = value.decode("latin-1")
    return _token(auth, api_key), signature


def _token(auth: bytes | None, api_key: bytes | None) -> str | None:
    if auth is not None:
        if auth.startswith(b"Bearer "):  # what clients send: the general case below, without its lower()
            token = auth[7:].decode("latin-1").strip()
            if token:
                return token
        else:
            scheme, _, token = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    if api_key is not None and api_key.strip():
        return api_key.decode("latin-1").strip()
    return None


class BodyTooLarge(Exception):
    pass


def announced_length(scope: Scope) -> int | None:
    """Content-Length if given, -1 for a chunked body, None for a request with no body."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
        if key == b"transfer-encoding":
            return -1
    return None


async def read_body(receive: Receive, limit: int, scope: Scope | None = None) -> bytes:
    """The whole request body, refused past ``limit`` bytes.

    With ``scope``, a request that announces no body is not read at all, and one with a
    Content-Length stops at that length: some servers (granian) answer a further ``receive()`` late.
    """
    expected = announced_length(scope) if scope is not None else -1
    if expected is None or expected == 0:
        return b""
    if expected > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False) or (expected > 0 and size >= expected):
            break
    return b"".join(chunks)


async def send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps(payload)
    raw_headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if headers:
        raw_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: KeyplaneError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    if headers:
        extra.extend(headers)
    await send_json(send, exc.status, exc.body(), extra)


async def client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (every other message of a streaming response is ignored)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientLeft(Exception):
    """The client disconnected before the relay finished: the relay was cancelled."""


async def relay_until_client_leaves(pump: Coroutine[Any, Any, None], receive: Receive) -> None:
    """Run ``pump`` (a stream's relay) until it ends or the client leaves, whichever comes first.

    Raises ``ClientLeft`` when the client left first (``pump`` is cancelled, so the upstream call is too),
    or whatever ``pump`` raised. Shared by the LLM proxy and the MCP gateway: one cancellation rule.
    """
    pumping = asyncio.ensure_future(pump)
    watching = asyncio.ensure_future(client_gone(receive))
    try:
        done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    if pumping not in done:
        raise ClientLeft
    pumping.result()
