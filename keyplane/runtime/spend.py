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
import math
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
    """(minute, UTC date, UTC month) of ``now``; formatted once per second (called where a counter's minute
    is past: _roll)."""
    global _last_windows
    second = int(now)
    if _last_windows[0] == second:
        return _last_windows[1]
    t = time.gmtime(now)
    found = (int(now) // 60, time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t))
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


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~5x more, and this is per request
class Ask:
    """A request's worst case, before it is forwarded."""

    prompt_tokens: int  # estimated, never below 1
    prompt_usd: float
    output_tokens: int  # the allowance wanted: what the request names, or the default allowance
    output_usd_per_token: float
    clamp: bool  # may the allowance be lowered to what the budget covers (else: refuse)
    # What the gateway read from the request (gateway/budget.py), so that writing the granted bound into it
    # reads nothing twice: the smallest output bound it names (0: none) and its choices (``n``).
    named: int = 0
    choices: int = 1


@dataclass(slots=True)
class Grant:
    """A reservation held for one request until it is settled or released."""

    id: str | int  # Redis: "{process}-{n}", names its record; this process's ledger: a number
    buckets: tuple[str, ...]  # the limited buckets it was reserved in
    tokens: int
    usd: float
    output_tokens: int  # the allowance granted (<= Ask.output_tokens)
    local: bool = True  # held in this process's ledger (embedded mode, or Redis fell back)
    done: bool = False
    family: str = ""  # the root key of the chain (names its Redis keys: runtime/spend_keys.py)
    chain: Chain | None = None  # reserved through SpendLedger.reserve_whole: settled without a lookup by name


def afford(ask: Ask, windows_left: list[tuple[float, float, str]]) -> int:
    """How much output the tightest window still pays for, given (limit, used incl. reserved, window name)
    for every limited window. Returns the output tokens granted, or ``-(i + 1)`` naming the
    window ``i`` that refuses. The rule of :meth:`SpendLedger.reserve` and of the Redis script
    (shared/spend.py: RESERVE_SCRIPT), spelled out once over a list."""
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
    if best < ask.output_tokens and (not ask.clamp or best < ask.choices):  # each choice at least a token
        return -(binding + 1)
    return best


class _Counters:
    """One bucket's settled spend in its current windows, and what reservations hold against it.
    One object per bucket, updated in place: a request reads and writes it without new tuples or dicts."""

    __slots__ = ("day", "day_usd", "held_tokens", "held_usd", "minute", "month", "month_usd", "seeded", "tokens")

    def __init__(self, minute: int, day: str, month: str) -> None:
        self.minute, self.tokens = minute, 0
        self.day, self.day_usd = day, 0.0
        self.month, self.month_usd = month, 0.0
        self.held_tokens, self.held_usd = 0, 0.0  # tokens are whole: int arithmetic, no float mixing
        self.seeded = False


class Chain:
    """A key's buckets resolved to their counters, once per key snapshot (gateway/budget.py's ``Plan`` holds
    it), so that a budgeted request reserves and settles without a lookup by name:

        held     (counters, tokens per minute, USD per day, USD per month) of each limited bucket (the key's
                 ``spend_limits``), a limit it does not set as infinity; ``holders``: those counters alone
        counted  the counters of every bucket its spend counts in (the key's ``spend_buckets``)

    A ledger never drops a bucket's counters (it rolls them in place), so a chain stays true for as long as
    its snapshot is the key's: a new snapshot (limits edited, a parent changed) gets a new chain."""

    __slots__ = ("counted", "held", "holders", "names")

    def __init__(self, names: tuple[str, ...], held: tuple[tuple[_Counters, float, float, float], ...],
                 counted: tuple[_Counters, ...]) -> None:
        self.names, self.held, self.counted = names, held, counted
        self.holders = tuple([c for c, _tokens, _day, _month in held])


def _limit(value: float | None) -> float:
    return math.inf if value is None else value


class SpendLedger:
    def __init__(self) -> None:
        self._buckets: dict[str, _Counters] = {}
        self._count = 0

    def _counters(self, bucket: str, now: float) -> _Counters:
        found = self._buckets.get(bucket)
        if found is None:
            found = self._buckets[bucket] = _Counters(*windows(now))
        return found

    def needs_seed(self, bucket: str) -> bool:
        found = self._buckets.get(bucket)
        return found is None or not found.seeded

    def seed(self, bucket: str, day_usd: float, month_usd: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        c = self._counters(bucket, now)
        if c.seeded:
            return
        _minute, day, month = windows(now)
        c.day_usd = (c.day_usd if c.day == day else 0.0) + day_usd
        c.month_usd = (c.month_usd if c.month == month else 0.0) + month_usd
        c.day, c.month, c.seeded = day, month, True

    def reserve(self, limited: tuple[tuple[str, Limits], ...], ask: Ask, now: float | None = None,
                seeded_only: bool = False) -> Grant | Exhausted | None:
        """All or nothing over every limited window of ``limited``: what the tightest window still pays for
        (the rule of :func:`afford`). ``seeded_only``: None, with nothing changed, when a bucket is not seeded
        yet (LocalSpend.reserve_now)."""
        return self.reserve_worst(limited, ask.prompt_tokens, ask.prompt_usd, ask.output_tokens,
                                  ask.output_usd_per_token, ask.clamp, now, seeded_only, ask.choices)

    def reserve_worst(self, limited: tuple[tuple[str, Limits], ...], ptok: int, pusd: float, wanted: int,
                      price: float, clamp: bool, now: float | None = None,
                      seeded_only: bool = False, choices: int = 1) -> Grant | Exhausted | None:
        """:meth:`reserve` of an :class:`Ask`'s fields (``ptok``: prompt tokens, ``pusd``: prompt USD,
        ``wanted``: output tokens wanted, ``price``: USD per output token), written out over the windows:
        this runs on every budgeted request, and the gateway's embedded path builds no ``Ask`` for it."""
        now = time.time() if now is None else now
        minute = int(now) // 60  # windows(now)[0], without a float floor division
        best = wanted
        binding: tuple[str, float, float] | None = None
        buckets = self._buckets
        for bucket, limits in limited:
            c = buckets.get(bucket)
            if c is None or not c.seeded:
                if seeded_only:
                    return None
                c = c or self._counters(bucket, now)
            if c.minute != minute:  # a new minute (day, month) since this bucket was last written
                _roll(c, now)
            # Each window: refused when the prompt alone does not fit (room < 0), else clamped to what fits.
            # The windows are written out, not a helper: a call per window per request was measurable on the
            # hot path (docs/performance.md, issue 17); a refusal is tested only where the window binds.
            limit: float | None = limits.tokens_per_minute
            if limit is not None:
                used = c.tokens + c.held_tokens
                room = limit - used - ptok  # whole tokens: what fits is the room itself
                if room < best:
                    if room < 0:
                        return _exhausted("tokens_per_minute", limit, used, now)
                    best, binding = int(room + 1e-9), ("tokens_per_minute", limit, used)
            limit = limits.cost_per_day_usd
            if limit is not None:
                used = c.day_usd + c.held_usd
                room = limit - used - pusd
                if price > 0:
                    fits = room / price + 1e-9
                    if fits < best:  # room < 0 binds too: best is never negative
                        if room < 0:
                            return _exhausted("cost_per_day_usd", limit, used, now)
                        best, binding = int(fits), ("cost_per_day_usd", limit, used)
                elif room < 0:
                    return _exhausted("cost_per_day_usd", limit, used, now)
            limit = limits.budget_per_month_usd
            if limit is not None:
                used = c.month_usd + c.held_usd
                room = limit - used - pusd
                if price > 0:
                    fits = room / price + 1e-9
                    if fits < best:
                        if room < 0:
                            return _exhausted("budget_per_month_usd", limit, used, now)
                        best, binding = int(fits), ("budget_per_month_usd", limit, used)
                elif room < 0:
                    return _exhausted("budget_per_month_usd", limit, used, now)
        # Clamped, each of the request's choices still gets a token at least (else n answers of one token
        # each would be generated against fewer reserved): below that, refused.
        if binding is not None and (not clamp or best < choices):
            return _exhausted(*binding, now)
        tokens = ptok + best
        usd = pusd + best * price
        if len(limited) == 1:  # a key without limited parents: ``c`` is its bucket's counters
            c.held_tokens += tokens
            c.held_usd += usd
            self._count += 1
            return Grant(self._count, (bucket,), tokens, usd, best)
        names = []
        for bucket, _limits in limited:
            c = buckets[bucket]
            c.held_tokens += tokens
            c.held_usd += usd
            names.append(bucket)
        self._count += 1
        return Grant(self._count, tuple(names), tokens, usd, best)

    def chain(self, limited: tuple[tuple[str, Limits], ...], buckets: tuple[str, ...]) -> Chain | None:
        """``limited`` (a key's ``spend_limits``) and ``buckets`` (its ``spend_buckets``) resolved to their
        counters (:class:`Chain`); None while a limited bucket is not seeded yet (:meth:`reserve` seeds it)."""
        held = []
        for bucket, limits in limited:
            c = self._buckets.get(bucket)
            if c is None or not c.seeded:
                return None
            held.append((c, _limit(limits.tokens_per_minute), _limit(limits.cost_per_day_usd),
                         _limit(limits.budget_per_month_usd)))
        now = time.time()
        counted = tuple([self._buckets.get(bucket) or self._counters(bucket, now) for bucket in buckets])
        return Chain(tuple([bucket for bucket, _limits in limited]), tuple(held), counted)

    def reserve_whole(self, chain: Chain, ptok: int, pusd: float, wanted: int, price: float) -> Grant | None:
        """The common case of :meth:`reserve_worst`, decided in a few comparisons: every window of ``chain``
        has room for the whole worst case (prompt and all ``wanted`` output tokens), in its current minute.
        Then the reservation is held and granted whole, as :meth:`reserve_worst` would grant it (the same
        expressions: a window's room, less the prompt, covers the output); None otherwise, with nothing
        changed: the request takes :meth:`reserve_worst`, which clamps, refuses or starts a new window."""
        minute = int(time.time()) // 60
        out_usd = wanted * price
        # A hair more than the output's price: where room / price would round to just under ``wanted`` (a
        # window with exactly the room), the rule clamps by a token; here such a window is left to the rule.
        need = out_usd * (1 + 1e-12)
        for c, tokens_limit, day_limit, month_limit in chain.held:
            if (c.minute != minute or tokens_limit - (c.tokens + c.held_tokens) - ptok < wanted
                    or day_limit - (c.day_usd + c.held_usd) - pusd < need
                    or month_limit - (c.month_usd + c.held_usd) - pusd < need):
                return None
        tokens = ptok + wanted
        usd = pusd + out_usd
        for c in chain.holders:
            c.held_tokens += tokens
            c.held_usd += usd
        self._count += 1
        return Grant(self._count, chain.names, tokens, usd, wanted, True, False, "", chain)  # positional: cheaper

    def settle(self, grant: Grant, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        """:meth:`release` then :meth:`add`, in one call (this runs on every budgeted request). A grant of
        :meth:`reserve_whole` names its counters: ``buckets`` is not read (its chain counts in them)."""
        chain = grant.chain
        holders = (chain.holders if chain is not None else
                   [c for c in map(self._buckets.get, grant.buckets) if c is not None])
        held_tokens, held_usd = grant.tokens, grant.usd
        for c in holders:
            c.held_tokens -= held_tokens
            c.held_usd -= held_usd
            if c.held_tokens <= 0 and c.held_usd <= 1e-12:  # no float dust left behind
                c.held_tokens, c.held_usd = 0, 0.0
        if tokens or cost_usd:  # self.add(buckets, tokens, cost_usd), written out: one call fewer per request
            now = time.time()
            minute = int(now) // 60
            counted = (chain.counted if chain is not None else
                       [self._buckets.get(bucket) or self._counters(bucket, now) for bucket in buckets])
            for c in counted:
                if c.minute != minute:
                    _roll(c, now)
                c.tokens += tokens
                c.day_usd += cost_usd
                c.month_usd += cost_usd

    def release(self, grant: Grant) -> None:
        for bucket in grant.buckets:
            c = self._buckets.get(bucket)
            if c is not None:
                c.held_tokens -= grant.tokens
                c.held_usd -= grant.usd
                if c.held_tokens <= 0 and c.held_usd <= 1e-12:  # no float dust left behind
                    c.held_tokens, c.held_usd = 0, 0.0

    def settled(self, bucket: str, now: float | None = None) -> tuple[float, float, float]:
        """(tokens this minute, USD today, USD this month) counted after answers."""
        now = time.time() if now is None else now
        minute, day, month = windows(now)
        c = self._buckets.get(bucket)
        if c is None:
            return 0.0, 0.0, 0.0
        return (float(c.tokens if c.minute == minute else 0), c.day_usd if c.day == day else 0.0,
                c.month_usd if c.month == month else 0.0)

    def reserved(self, bucket: str) -> tuple[float, float]:
        """(tokens, USD) held by reservations not yet settled."""
        c = self._buckets.get(bucket)
        return (float(c.held_tokens), c.held_usd) if c is not None else (0.0, 0.0)

    def add(self, buckets: tuple[str, ...], tokens: int, cost_usd: float, now: float | None = None) -> None:
        if not tokens and not cost_usd:
            return
        now = time.time() if now is None else now
        minute = int(now) // 60
        for bucket in buckets:
            c = self._buckets.get(bucket) or self._counters(bucket, now)
            if c.minute != minute:
                _roll(c, now)
            c.tokens += tokens
            c.day_usd += cost_usd
            c.month_usd += cost_usd


def _roll(c: _Counters, now: float) -> None:
    """Start the windows of ``now`` where ``c``'s are past (what a counter of an earlier window held is not
    this window's). A counter's minute is current only with its day and month (every write sets them
    together, a seed the day and month of the current time): one comparison on each request, not three."""
    minute, day, month = windows(now)
    if c.minute != minute:
        c.minute, c.tokens = minute, 0
    if c.day != day:
        c.day, c.day_usd = day, 0.0
    if c.month != month:
        c.month, c.month_usd = month, 0.0


def _exhausted(name: str, limit: float, used: float, now: float) -> Exhausted:
    return Exhausted(name, limit, used, resets_at(name, now), max(0.0, limit - used))


class LocalSpend:
    """Embedded mode: the ledger in this process, each bucket seeded from the store on first use."""

    def __init__(self, spent_so_far: Callable[[str], Awaitable[tuple[float, float]]]) -> None:
        self.ledger = SpendLedger()
        # The ledger a caller may reserve in and settle to without an ``await`` (the gateway, once a bucket is
        # seeded): this one. SharedSpend's is None: its windows are in Redis.
        self.sync_ledger: SpendLedger | None = self.ledger
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
        found = self.ledger.reserve(limited, ask, seeded_only=True)
        if found is None:
            await self._seed(limited)
            found = self.ledger.reserve(limited, ask)
        return found  # type: ignore[return-value]  # None only with seeded_only

    def reserve_now(self, limited: tuple[tuple[str, Limits], ...], ask: Ask) -> Grant | Exhausted | None:
        """:meth:`reserve` without an ``await`` once every bucket of ``limited`` is seeded (every request but
        a bucket's first in this process); None: not yet, :meth:`reserve` it."""
        return self.ledger.reserve(limited, ask, None, True)

    async def settle(self, grant: Grant, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        """Drop the reservation and count what the answer cost (nothing: a release). Idempotent."""
        if grant.done:
            return
        grant.done = True
        self.ledger.settle(grant, buckets, tokens, cost_usd)

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
