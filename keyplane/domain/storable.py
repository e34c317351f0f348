"""What text and integers must look like to be stored by every supported database.

PostgreSQL refuses NUL (U+0000) and lone surrogates in text and integers past 32 bits in INTEGER
columns; SQLite takes all three. Inputs are held to the stricter store, so both answer the same.
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
NUL = "\x00"


def has_nul(value: str) -> bool:
    return NUL in value


def storable_text(value: str, max_length: int | None = None) -> str:
    """``value`` with NUL replaced by U+FFFD, lone surrogates by '?', cut to ``max_length``."""
    if NUL in value:
        value = value.replace(NUL, "\ufffd")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value if max_length is None else value[:max_length]


def storable_int(value: int) -> int:
    return max(INT32_MIN, min(INT32_MAX, value))
