"""Opaque cursors over an increasing integer column."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TypeVar

from keyplane.domain.errors import invalid_request

T = TypeVar("T")


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("p"):
            raise ValueError
        return int(raw[1:])
    except (ValueError, UnicodeDecodeError):
        raise invalid_request("'cursor' is not a cursor this API returned") from None


def page(rows: list[T], limit: int, position: Callable[[T], int]) -> tuple[list[T], str | None]:
    """Rows fetched with ``limit + 1``: the page, and the cursor of the next one (None on the last)."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(position(rows[-1])) if more and rows else None
