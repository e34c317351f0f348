"""The MCP SDK answers a few refusals in plain text (its DNS-rebinding guard: ``Invalid Host header``,
``Invalid Origin header``, ``Invalid Content-Type header``). Rewritten here into keyplane's one error shape;
JSON-RPC answers and event streams pass through untouched."""

from __future__ import annotations

from typing import Any

from keyplane.domain.errors import KeyplaneError
from keyplane.gateway.asgi import Send, send_error

_CODES = {400: "invalid_request", 403: "origin_not_allowed", 413: "payload_too_large", 421: "host_not_allowed"}
_KEEP = (b"application/json", b"text/event-stream")


def in_error_shape(send: Send) -> Send:
    held: dict[str, Any] = {}

    async def shaped(message: Any) -> None:
        if message["type"] == "http.response.start":
            content_type = next((v for k, v in message.get("headers", ()) if k.lower() == b"content-type"), b"")
            if message["status"] >= 400 and not content_type.startswith(_KEEP):
                held["status"], held["body"] = message["status"], b""
                return
        elif message["type"] == "http.response.body" and "status" in held:
            held["body"] += message.get("body", b"")
            if message.get("more_body", False):
                return
            status = held.pop("status")
            text = held.pop("body").decode("utf-8", "replace").strip()[:200] or "Refused"
            code = _CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
            await send_error(send, KeyplaneError(status, code, text))
            return
        await send(message)

    return shaped
