"""How the templates show times, dates and numbers (Jinja filters)."""

from __future__ import annotations

from datetime import UTC, datetime


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 0:
        return "in " + _span(-seconds)
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return "seconds"


def _date(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value.replace("T", " ")[:16]
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _thousands(value: int) -> str:
    return f"{value:,}"

