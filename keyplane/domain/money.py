"""Amounts of money as people read them: ``$0.000009``, ``$0.012``, ``$3.80``, ``$12,345.67``.

Per-request costs are fractions of a cent; Python's ``str`` writes them as ``9e-06``. Below a dollar this
keeps two significant digits (at least two decimals); from a dollar up, cents.
"""

from __future__ import annotations

import math


def usd(value: float | None) -> str:
    if value is None:
        return "—"
    sign, amount = ("-" if value < 0 else ""), abs(float(value))
    if amount == 0:
        return "$0.00"
    if amount >= 1:
        return f"{sign}${amount:,.2f}"
    decimals = max(2, 1 - math.floor(math.log10(amount)))
    text = f"{amount:.{decimals}f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{sign}${whole}.{fraction}"
