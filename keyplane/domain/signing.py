"""Request signing: ``X-MCP-Signature`` = hex HMAC-SHA256 keyed with the API key over ``"{ts}.{body}"``.

A signature has one canonical form, 64 lower-case hex digits (surrounding whitespace ignored):
the check compares that form and the replay window remembers that form, so a re-sent request
cannot slip past the window by changing the signature's case or padding. Anything that is not
ASCII digits (timestamp) or ASCII hex (signature) is refused as a bad signature, never an error.
"""

from __future__ import annotations

import hashlib
import hmac
import string
from dataclasses import dataclass

MAX_SKEW_SECONDS = 300
SIGNATURE_LEN = 64  # hex digits of a SHA-256 HMAC
_HEX = frozenset(string.hexdigits.lower())
_DIGITS = frozenset(string.digits)


def sign(api_key: str, timestamp: str, body: bytes) -> str:
    return hmac.new(api_key.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def canonical(signature: str) -> str | None:
    """The one form a signature is compared and remembered in, or None if it cannot be a signature."""
    form = signature.strip().lower()
    if len(form) != SIGNATURE_LEN or not _HEX.issuperset(form):
        return None
    return form


@dataclass(frozen=True, slots=True)
class Checked:
    """The outcome of a signature check: ``problem`` is None when good; ``signature`` is then its canonical form."""

    problem: str | None
    signature: str = ""


def check(api_key: str, timestamp: str | None, signature: str | None, body: bytes, now: float) -> Checked:
    """Why a signature is bad (for the error message, never the secret), or its canonical form."""
    if not timestamp or not signature:
        return Checked("This key requires signed requests: send X-MCP-Timestamp and X-MCP-Signature")
    if len(timestamp) > 12 or not _DIGITS.issuperset(timestamp):
        return Checked("X-MCP-Timestamp must be unix seconds")
    if abs(now - int(timestamp)) > MAX_SKEW_SECONDS:
        return Checked(f"X-MCP-Timestamp is more than {MAX_SKEW_SECONDS} seconds away from the server's clock")
    form = canonical(signature)
    if form is None or not hmac.compare_digest(sign(api_key, timestamp, body), form):
        return Checked("X-MCP-Signature does not match the request")
    return Checked(None, form)
