"""Tokens per minute, cost per UTC day and budget per UTC month, per key and summed up its parents.

Counters live in memory (embedded mode), keyed by bucket and window. A bucket's day and month are
seeded once per process from the usage already in the store, so a restart does not reset a budget.

A request's spend goes through three steps, so that concurrent requests cannot spend the same dollar:

    reserve(ask)   worst case (estimated prompt + output allowance) against every limited window of
                   the key and its ancestors, all or nothing; the allowance may be lowered (clamped) to
                   what the tightest window still covers, or the request is refused
    settle(grant)  the reservation is dropped and the answer's actual tokens and cost are counted
    release        = settle with nothing spent (failed, refused upstream, cancelled)

A window admits a reservation while settled + reserved + this reservation <= limit.
"""

from __future__ import annotations

import asyncio
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
    remaining: float = 0.0  # what is left of the window (settled and reserved spend deducted)

    @property
    def is_rate(self) -> bool:
        return self.limit == "tokens_per_minute"


_last_windows: tuple[int, tuple[int, str, str]] = (-1, (0, "", ""))


def windows(now: float) -> tuple[int, str, str]:
    """(minute, UTC date, UTC month) of ``now``; formatted once per second (this runs twice per request)."""
    global _last_windows
    second = int(now)
    if _last_windows[0] == second:
        return _last_windows[1]
    t = time.gmtime(now)
    found = (int(now // 60), time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t))
    _last_windows = (second, found)
    return found


def resets_at(window: str, now: float) -> float:
    if window == "tokens_per_minute":
        return (now // 60 + 1) * 60.0
    return day_end(now) if window == "cost_per_day_usd" else month_end(now)


def day_end(now: float) -> float:
    return (int(now // 86400) + 1) * 86400.0


def month_end(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


WINDOW_NAMES = ("tokens_per_minute", "cost_per_day_usd", "budget_per_month_usd")


@dataclass(frozen=True, slots=True)
class Ask:
    """A request's worst case, before it is forwarded."""

    prompt_tokens: int  # estimated, never below 1
    prompt_usd: float
    output_tokens: int  # the allowance wanted: what the request names, or the default allowance
    output_usd_per_token: float
    clamp: bool  # may the allowance be lowered to what the budget covers (else: refuse)


@dataclass(slots=True)
class Grant:
    """A reservation held for one request until it is settled or released."""

    id: str
    buckets: tuple[str, ...]  # the limited buckets it was reserved in
    tokens: int
    usd: float
    output_tokens: int  # the allowance granted (<= Ask.output_tokens)
    local: bool = True  # held in this process's ledger (embedded mode, or Redis fell back)
    done: bool = False
    family: str = ""  # the root key of the chain (names its Redis keys: runtime/spend_keys.py)


def afford(ask: Ask, windows_left: list[tuple[float, float, str]]) -> int:
    """How much output the tightest window still pays for, given (limit, used incl. reserved, window name)
    for every limited window. Returns the output tokens granted, or ``-(i + 1)`` naming the
    window ``i`` that refuses. The same rule as the Redis script (shared/spend.py: RESERVE_SCRIPT)."""
    best = ask.output_tokens
    binding = -1
    for i, (limit, used, name) in enumerate(windows_left):
        tokens = name == "tokens_per_minute"
        room = limit - used - (ask.prompt_tokens if tokens else ask.prompt_usd)
        if room < 0:
            return -(i + 1)
        per = 1.0 if tokens else ask.output_usd_per_token
        if per > 0:
            fits = int(room / per + 1e-9)
            if fits < best:
                best, binding = fits, i
    if best < ask.output_tokens and (not ask.clamp or best < 1):
        return -(binding + 1)
    return best


class SpendLedger:
    def __init__(self) -> None:
        self._tokens: dict[str, tuple[int, int]] = {}  # bucket -> (minute, tokens)
        self._day: dict[str, tuple[str, float]] = {}  # bucket -> (date, usd)
        self._month: dict[str, tuple[str, float]] = {}  # bucket -> (yyyy-mm, usd)
        self._seeded: set[str] = set()
        self._reserved: dict[str, list[float]] = {}  # bucket -> [tokens, usd] held by reservations
        self._count = 0

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

    def reserve(self, limited: tuple[tuple[str, Limits], ...], ask: Ask,
                now: float | None = None) -> Grant | Exhausted:
        """All or nothing over every limited window of ``limited``: see :func:`afford`."""
        now = time.time() if now is None else now
        minute, day, month = windows(now)
        found: list[tuple[float, float, str]] = []
        for bucket, limits in limited:
            held = self._reserved.get(bucket, (0.0, 0.0))
            if limits.tokens_per_minute is not None:
                at, used = self._tokens.get(bucket, (minute, 0))
                found.append((limits.tokens_per_minute, (used if at == minute else 0) + held[0],
                              "tokens_per_minute"))
            if limits.cost_per_day_usd is not None:
                at_day, spent = self._day.get(bucket, (day, 0.0))
                found.append((limits.cost_per_day_usd, (spent if at_day == day else 0.0) + held[1],
                              "cost_per_day_usd"))
            if limits.budget_per_month_usd is not None:
                at_month, spent = self._month.get(bucket, (month, 0.0))
                found.append((limits.budget_per_month_usd, (spent if at_month == month else 0.0) + held[1],
                              "budget_per_month_usd"))
        granted = afford(ask, found)
        if granted < 0:
            limit, used, name = found[-granted - 1]
            return Exhausted(name, limit, used, resets_at(name, now), max(0.0, limit - used))
        tokens = ask.prompt_tokens + granted
        usd = ask.prompt_usd + granted * ask.output_usd_per_token
        buckets = tuple(bucket for bucket, _ in limited)
        for bucket in buckets:
            held_now = self._reserved.setdefault(bucket, [0.0, 0.0])
            held_now[0] += tokens
            held_now[1] += usd
        self._count += 1
        return Grant(f"l{self._count}", buckets, tokens, usd, granted)

    def release(self, grant: Grant) -> None:
        for bucket in grant.buckets:
            held = self._reserved.get(bucket)
            if held is not None:
                held[0] -= grant.tokens
                held[1] -= grant.usd
                if held[0] <= 0 and held[1] <= 1e-12:
                    del self._reserved[bucket]

    def settled(self, bucket: str, now: float | None = None) -> tuple[float, float, float]:
        """(tokens this minute, USD today, USD this month) counted after answers."""
        now = time.time() if now is None else now
        minute, day, month = windows(now)
        at, used = self._tokens.get(bucket, (minute, 0))
        at_day, spent_day = self._day.get(bucket, (day, 0.0))
        at_month, spent_month = self._month.get(bucket, (month, 0.0))
        return (float(used if at == minute else 0), spent_day if at_day == day else 0.0,
                spent_month if at_month == month else 0.0)

    def reserved(self, bucket: str) -> tuple[float, float]:
        """(tokens, USD) held by reservations not yet settled."""
        held = self._reserved.get(bucket, (0.0, 0.0))
        return held[0], held[1]

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

    async def _seed(self, limited: tuple[tuple[str, Limits], ...]) -> None:
        unseeded = [bucket for bucket, _limits in limited if self.ledger.needs_seed(bucket)]
        if unseeded:  # a sub-key and its parents: seeded side by side, not one round trip after another
            seeds = await asyncio.gather(*(self.spent_so_far(bucket) for bucket in unseeded))
            for bucket, (day, month) in zip(unseeded, seeds, strict=True):
                self.ledger.seed(bucket, day, month)

    async def reserve(self, limited: tuple[tuple[str, Limits], ...], ask: Ask,
                      family: str = "") -> Grant | Exhausted:
        """``family`` (the chain's root key) matters to Redis only: this process keys by bucket alone."""
        await self._seed(limited)
        return self.ledger.reserve(limited, ask)

    async def settle(self, grant: Grant, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        """Drop the reservation and count what the answer cost (nothing: a release). Idempotent."""
        if grant.done:
            return
        grant.done = True
        self.ledger.release(grant)
        self.ledger.add(buckets, tokens, cost_usd)

    async def reserved(self, bucket: str, family: str | None = None) -> tuple[float, float]:
        return self.ledger.reserved(bucket)

    async def current(self, bucket: str, family: str | None = None
                      ) -> tuple[tuple[float, float, float], tuple[float, float]]:
        """(settled tokens this minute, USD today, USD this month), (reserved tokens, reserved USD)."""
        if self.ledger.needs_seed(bucket):
            day, month = await self.spent_so_far(bucket)
            self.ledger.seed(bucket, day, month)
        return self.ledger.settled(bucket), self.ledger.reserved(bucket)

    async def add(self, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        self.ledger.add(buckets, tokens, cost_usd)
