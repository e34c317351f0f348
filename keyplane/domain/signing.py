"""Request signing: ``X-MCP-Signature`` = hex HMAC-SHA256 keyed with the API key over ``"{ts}.{body}"``."""

from __future__ import annotations

import hashlib
import hmac

MAX_SKEW_SECONDS = 300


def sign(api_key: str, timestamp: str, body: bytes) -> str:
    return hmac.new(api_key.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def check(api_key: str, timestamp: str | None, signature: str | None, body: bytes, now: float) -> str | None:
    """None when the signature is good; otherwise why not (for the error message, never the secret)."""
    if not timestamp or not signature:
        return "This key requires signed requests: send X-MCP-Timestamp and X-MCP-Signature"
    if not timestamp.isdigit() or len(timestamp) > 12:
        return "X-MCP-Timestamp must be unix seconds"
    if abs(now - int(timestamp)) > MAX_SKEW_SECONDS:
        return f"X-MCP-Timestamp is more than {MAX_SKEW_SECONDS} seconds away from the server's clock"
    expected = sign(api_key, timestamp, body)
    if not hmac.compare_digest(expected, signature.strip().lower()):
        return "X-MCP-Signature does not match the request"
    return None
