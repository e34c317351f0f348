"""A request's outcome: the one rule every count of usage follows (events, rollups, summaries).

    requests ─┬─ served    status < 400
              ├─ refused   401, 403, 429: keyplane turned it away (key, scope, IP, model, rate limit, budget)
              └─ failed    any other status ≥ 400 (a bad request, no such model, the upstream failed)
"""

from __future__ import annotations

REFUSED_STATUSES = (401, 403, 429)


def outcome(status: int) -> str:
    """served, refused or failed (see the module docstring)."""
    if status < 400:
        return "served"
    return "refused" if status in REFUSED_STATUSES else "failed"
