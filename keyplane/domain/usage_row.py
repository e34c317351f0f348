"""A usage event as the gateway records it: one plain tuple, its fields in the order below.

Every data-plane request makes one, so it is built without a dict or a ``datetime``: the time is integer
microseconds since the epoch (UTC) from ``time.time_ns()``, exact, turned into the stored text or a
``datetime`` only when a batch is written. The first twelve fields are the rollups' dimensions in their
order (``keyplane.store.rollups``), so events with the same dimensions are grouped by one slice.

Events given as dicts (the column names as keys, ``time`` a ``datetime``: tests, backfills,
``bench/scale.py``) become rows through ``row_of``.
"""

from __future__ import annotations

import time as _time
from datetime import UTC, datetime, timedelta
from typing import Any

FIELDS = ("org_id", "key_id", "parent_id", "provider", "model", "cost_center", "environment", "endpoint",
          "mcp_server", "tool", "status", "code", "mcp_method", "input_tokens", "output_tokens",
          "cache_write_tokens", "cache_read_tokens", "cost_usd", "latency_ms", "client_ip", "time")
(ORG_ID, KEY_ID, PARENT_ID, PROVIDER, MODEL, COST_CENTER, ENVIRONMENT, ENDPOINT, MCP_SERVER, TOOL, STATUS, CODE,
 MCP_METHOD, INPUT_TOKENS, OUTPUT_TOKENS, CACHE_WRITE_TOKENS, CACHE_READ_TOKENS, COST_USD, LATENCY_MS, CLIENT_IP,
 TIME) = range(len(FIELDS))
DIMENSIONS_END = CODE + 1  # row[:DIMENSIONS_END]: what a rollup row is keyed by (before normalising)
_ZERO_IF_MISSING = frozenset({"cache_write_tokens", "cache_read_tokens"})  # older events lack them

Row = tuple[Any, ...]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def now_us() -> int:
    return _time.time_ns() // 1000


def us_of(at: datetime) -> int:
    """Exact microseconds since the epoch; a naive time is taken as UTC (as the store holds it)."""
    return ((at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


def datetime_of(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def row_of(event: dict[str, Any]) -> Row:
    """A dict event (column names as keys) as a row; a missing field is None (0 for the cache counts)."""
    at = event.get("time")
    return (*(event.get(name, 0) if name in _ZERO_IF_MISSING else event.get(name) for name in FIELDS[:TIME]),
            us_of(at) if isinstance(at, datetime) else at)


def as_dict(row: Row) -> dict[str, Any]:
    """The row as the ORM's insert takes it (``time`` a ``datetime``)."""
    event = dict(zip(FIELDS, row, strict=True))
    event["time"] = datetime_of(row[TIME])
    return event


_THREE_DIGITS = tuple(f"{i:03d}" for i in range(1000))


class StoredTime:
    """``YYYY-MM-DD HH:MM:SS.ffffff`` (naive UTC text, as SQLAlchemy stores a time on SQLite), the
    second's part formatted once per second rather than once per event, the microseconds from a table
    of three-digit strings (a format spec per event was half of this)."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def __call__(self, us: int) -> str:
        second = us // 1_000_000
        if second != self._second:
            self._second = second
            self._stamp = _time.strftime("%Y-%m-%d %H:%M:%S.", _time.gmtime(second))
        return self._stamp + _THREE_DIGITS[us // 1000 % 1000] + _THREE_DIGITS[us % 1000]
