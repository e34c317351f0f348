"""Tokens per minute, cost per UTC day and budget per UTC month, per key and summed up its parents.

Counters live in memory (embedded mode), keyed by bucket and window. A bucket's day and month are
seeded once per process from the usage already in the store, so a restart does not reset a budget.
A request is refused while a window is already spent; what it then costs is known only from the
upstream's answer, so the request that crosses a limit completes and the next one is refused.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from keyplane.domain.policy import Limits


@dataclass(frozen=True, slots=True)
class Exhausted:
    limit: str  # "tokens_per_minute" | "cost_per_day_usd" | "budget_per_month_usd"
    value: float
    spent: float
    resets_at: float  # unix seconds

    @property
    def is_rate(self) -> bool:
        return self.limit == "tokens_per_minute"


def windows(now: float) -> tuple[int, str, str]:
    t = time.gmtime(now)
    return int(now // 60), time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t)


def day_end(now: float) -> float:
    return (int(now // 86400) + 1) * 86400.0


def month_end(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


class SpendLedger:
    def __init__(self) -> None:
        self._tokens: dict[str, tuple[int, int]] = {}  # bucket -> (minute, tokens)
        self._day: dict[str, tuple[str, float]] = {}  # bucket -> (date, usd)
        self._month: dict[str, tuple[str, float]] = {}  # bucket -> (yyyy-mm, usd)
        self._seeded: set[str] = set()

    def needs_seed(self, bucket: str) -> bool:
        return bucket not in self._seeded

    def seed(self, bucket: str, day_usd: float, month_usd: float, now: float | None = None) -> None:
        if bucket in self._seeded:
            return
        now = time.time() if now is None else now
        _minute, day, month = windows(now)
        self._day[bucket] = (day, self._day.get(bucket, (day, 0.0))[1] + day_usd)
        self._month[bucket] = (month, self._month.get(bucket, (month, 0.0))[1] + month_usd)
        self._seeded.add(bucket)

    def check(self, buckets: tuple[tuple[str, Limits], ...], now: float | None = None) -> Exhausted | None:
        now = time.time() if now is None else now
        minute, day, month = windows(now)
        for bucket, limits in buckets:
            if limits.tokens_per_minute is not None:
                at, used = self._tokens.get(bucket, (minute, 0))
                used = used if at == minute else 0
                if used >= limits.tokens_per_minute:
                    return Exhausted("tokens_per_minute", limits.tokens_per_minute, used, (minute + 1) * 60.0)
            if limits.cost_per_day_usd is not None:
                at_day, spent = self._day.get(bucket, (day, 0.0))
                spent = spent if at_day == day else 0.0
                if spent >= limits.cost_per_day_usd:
                    return Exhausted("cost_per_day_usd", limits.cost_per_day_usd, spent, day_end(now))
            if limits.budget_per_month_usd is not None:
                at_month, spent = self._month.get(bucket, (month, 0.0))
                spent = spent if at_month == month else 0.0
                if spent >= limits.budget_per_month_usd:
                    return Exhausted("budget_per_month_usd", limits.budget_per_month_usd, spent, month_end(now))
        return None

    def add(self, buckets: tuple[str, ...], tokens: int, cost_usd: float, now: float | None = None) -> None:
        if not tokens and not cost_usd:
            return
        now = time.time() if now is None else now
        minute, day, month = windows(now)
        for bucket in buckets:
            at, used = self._tokens.get(bucket, (minute, 0))
            self._tokens[bucket] = (minute, (used if at == minute else 0) + tokens)
            at_day, spent = self._day.get(bucket, (day, 0.0))
            self._day[bucket] = (day, (spent if at_day == day else 0.0) + cost_usd)
            at_month, spent_m = self._month.get(bucket, (month, 0.0))
            self._month[bucket] = (month, (spent_m if at_month == month else 0.0) + cost_usd)


class LocalSpend:
    """Embedded mode: the ledger in this process, each bucket seeded from the store on first use."""

    def __init__(self, spent_so_far: Callable[[str], Awaitable[tuple[float, float]]]) -> None:
        self.ledger = SpendLedger()
        self.spent_so_far = spent_so_far

    async def check(self, buckets: tuple[tuple[str, Limits], ...]) -> Exhausted | None:
        for bucket, _limits in buckets:
            if self.ledger.needs_seed(bucket):
                day, month = await self.spent_so_far(bucket)
                self.ledger.seed(bucket, day, month)
        return self.ledger.check(buckets)

    async def add(self, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        self.ledger.add(buckets, tokens, cost_usd)
