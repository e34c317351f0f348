"""A latency sketch that merges by addition: fixed log-scale histogram buckets, stored per rollup row.

Bucket 0 holds latencies under 1 ms; bucket ``i`` (1 ≤ i < BUCKETS - 1) holds ``[2^((i-1)/3), 2^(i/3))``
milliseconds; the last bucket holds everything from ``2^((BUCKETS-2)/3)`` ms (~262 s) up. Because the
edges are fixed, two sketches merge by adding their counts, so a sum over rollup rows (in SQL) is the
sketch of all their events.

A percentile is answered with the geometric middle of the bucket that holds the nearest-rank value
(the same rank rule as an exact percentile over sorted values). Its error, stated once here and in
docs/operations.md:

- 1 ms to ~262 s: within ``RELATIVE_ERROR`` = 2^(1/6) - 1 ≈ 12.3 % of the exact value;
- under 1 ms: reported as 0.5 ms (off by at most 0.5 ms);
- above ~262 s: reported as the last bucket's lower edge (a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BUCKETS = 56
STEPS_PER_DOUBLING = 3
RELATIVE_ERROR = 2 ** (1 / (2 * STEPS_PER_DOUBLING)) - 1
COLUMNS = tuple(f"lat_{i:02d}" for i in range(BUCKETS))
_TOP = BUCKETS - 1
_TOP_EDGE = 2 ** ((BUCKETS - 2) / STEPS_PER_DOUBLING)


def bucket_of(latency_ms: float) -> int:
    if not latency_ms >= 1.0:  # also NaN
        return 0
    if latency_ms >= _TOP_EDGE:
        return _TOP
    return min(_TOP - 1, math.floor(STEPS_PER_DOUBLING * math.log2(latency_ms)) + 1)


def representative(bucket: int) -> float:
    if bucket <= 0:
        return 0.5
    if bucket >= _TOP:
        return _TOP_EDGE
    low = 2 ** ((bucket - 1) / STEPS_PER_DOUBLING)
    return low * 2 ** (1 / (2 * STEPS_PER_DOUBLING))


def percentile(counts: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of the events the bucket ``counts`` describe (0.0 when empty)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * total))
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return round(representative(i), 3)
    return round(representative(len(counts) - 1), 3)
