"""Generic Cell Rate Algorithm: one timestamp per bucket, exact burst, no background refill.

A bucket allowing ``limit`` requests per ``period`` seconds with a burst of ``limit`` keeps a
theoretical arrival time (TAT). A request at ``now`` is admitted when ``max(TAT, now) + I - burst*I
<= now`` (``I = period / limit``), and then moves the TAT on by ``I``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the bucket is full again
    retry_after: float  # seconds until one more request would be admitted (0 when allowed)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """IETF draft ``RateLimit-*`` headers (and ``Retry-After`` on a refusal), whole seconds."""
        out = [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(max(0, math.ceil(self.reset_after))).encode()),
        ]
        if not self.allowed:
            out.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return out


def decide(tat: float | None, now: float, limit: int, period: float = 60.0) -> tuple[Verdict, float | None]:
    """Returns the verdict and the bucket's new TAT (None when refused: nothing changes)."""
    interval = period / limit
    burst_span = limit * interval
    current = now if tat is None or tat < now else tat
    new_tat = current + interval
    allow_at = new_tat - burst_span
    if allow_at > now:
        remaining = 0
        return Verdict(False, limit, remaining, current - now, allow_at - now), None
    remaining = min(limit - 1, int((now - allow_at) / interval + 1e-9))
    return Verdict(True, limit, remaining, new_tat - now, 0.0), new_tat


def tighter(a: Verdict, b: Verdict) -> Verdict:
    """The verdict to report when a request passes through several buckets (a sub-key and its parent)."""
    if a.allowed != b.allowed:
        return b if not b.allowed else a
    if not a.allowed:
        return a if a.retry_after >= b.retry_after else b
    return a if a.remaining <= b.remaining else b
