"""Checks on the request itself, before any route reads it: the same answer whichever store is behind.

A NUL byte (``%00``) in a path or query parameter reaches SQL as text PostgreSQL refuses (SQLite takes it),
so it is refused here, for every route of the control plane and the dashboard at once.
"""

from __future__ import annotations

from keyplane.domain.errors import KeyplaneError, invalid_request
from keyplane.gateway.asgi import Scope


def url_refusal(scope: Scope) -> KeyplaneError | None:
    if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
        return invalid_request("The URL holds a NUL byte (%00), which no parameter may contain")
    return None
