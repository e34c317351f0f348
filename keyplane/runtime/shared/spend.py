"""Spend windows in Redis: tokens per minute, USD per day and month, and the reservations held against them."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from keyplane.domain.policy import Limits
from keyplane.runtime.spend import (
    WINDOW_NAMES,
    Ask,
    Exhausted,
    Grant,
    LocalSpend,
    SpendLedger,
    day_end,
    month_end,
)
from keyplane.runtime.spend_keys import SpendKeys

if TYPE_CHECKING:
    from keyplane.runtime.shared.state import SharedState

log = logging.getLogger("keyplane.redis")


# Adds to a day or month counter only once it has been seeded from the store (else the seed would be lost).
ADD_IF_SEEDED = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBYFLOAT', KEYS[i], ARGV[1]) end
end
return 1
"""


# Drop what a reservation's record ({tokens, USD, bucket names}) holds in each bucket. Where a bucket then
# holds no tokens, it holds no reservation (each holds at least a prompt token): its USD is set to 0 exactly,
# not left as the float dust of adding and taking back amounts in another order (as spend.SpendLedger does).
RELEASE = """
local function release(r)
  for j = 1, #r[3] do
    local held = tonumber(redis.call('INCRBYFLOAT', r[3][j] .. ':rt', -r[1]))
    redis.call('INCRBYFLOAT', r[3][j] .. ':ru', -r[2])
    if held <= 0 then
      redis.call('SET', r[3][j] .. ':rt', '0', 'KEEPTTL')
      redis.call('SET', r[3][j] .. ':ru', '0', 'KEEPTTL')
    end
  end
end
"""

# Reserve a request's worst case over every limited window of a key and its ancestors, all or nothing
# (the rule of spend.afford). KEYS: the family's reservation queue (sorted set: id -> deadline), the
# reservation's record, then per limited bucket: tokens this minute, USD today, USD this month, reserved
# tokens, reserved USD; all in one hash slot (names: runtime/spend_keys.py). ARGV: the family's prefix,
# id, ttl seconds, prompt tokens, prompt USD, output tokens wanted, output USD per token, the least output
# a clamp may grant (the request's choices: a token each; 0: no clamping),
# then per bucket its tokens/min, day and month limits (-1: none).
# Returns {1, granted output tokens}, {0, window index (0-based, in KEYS order), used incl. reserved},
# or {-1, bucket index} when a day/month counter is not seeded yet (the caller seeds and retries).
# Expired reservations (a process died holding them) are dropped first, 100 at a time.
RESERVE_SCRIPT = RELEASE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local prefix = ARGV[1]
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, old in ipairs(expired) do
  local rec = redis.call('GET', prefix .. 'rs:' .. old)
  if rec then
    release(cjson.decode(rec))
    redis.call('DEL', prefix .. 'rs:' .. old)
  end
  redis.call('ZREM', KEYS[1], old)
end
local ttl = tonumber(ARGV[3])
local ptok, pusd = tonumber(ARGV[4]), tonumber(ARGV[5])
local wanted, price, least = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local clamp = least > 0
local n = (#KEYS - 2) / 5
local best, binding = wanted, -1
local used = {}
for i = 0, n - 1 do
  local k = 3 + 5 * i
  local minute = tonumber(redis.call('GET', KEYS[k]) or '0')
  local day, month = redis.call('GET', KEYS[k + 1]), redis.call('GET', KEYS[k + 2])
  if not day or not month then return {-1, i} end
  local rt = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
  local ru = tonumber(redis.call('GET', KEYS[k + 4]) or '0')
  local spent = {minute + rt, tonumber(day) + ru, tonumber(month) + ru}
  for w = 1, 3 do
    local limit = tonumber(ARGV[8 + 3 * i + w])
    if limit >= 0 then
      local idx = 3 * i + w - 1
      used[idx] = spent[w]
      local room, per = limit - spent[w] - pusd, price
      if w == 1 then room, per = limit - spent[w] - ptok, 1 end
      if room < 0 then return {0, idx, tostring(spent[w])} end
      if per > 0 then
        local fits = math.floor(room / per + 1e-9)
        if fits < best then best, binding = fits, idx end
      end
    end
  end
end
if best < wanted and ((not clamp) or best < least) then return {0, binding, tostring(used[binding])} end
local tok, usd = ptok + best, pusd + best * price
local names = {}
for i = 0, n - 1 do
  local base = string.sub(KEYS[3 + 5 * i + 3], 1, -4)
  names[#names + 1] = base
  redis.call('INCRBYFLOAT', KEYS[3 + 5 * i + 3], tok)
  redis.call('INCRBYFLOAT', KEYS[3 + 5 * i + 4], usd)
  redis.call('EXPIRE', KEYS[3 + 5 * i + 3], ttl + 3600)
  redis.call('EXPIRE', KEYS[3 + 5 * i + 4], ttl + 3600)
end
redis.call('SET', KEYS[2], cjson.encode({tok, usd, names}), 'EX', ttl + 3600)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl + 3600)
return {1, best}
"""

# Settle a reservation: drop what it holds (if it has not expired) and count the answer's actual tokens and
# cost in every bucket, once: a settle sent again (its first answer was lost to a timeout) finds the
# reservation's "done" mark and counts nothing. KEYS: the queue, the record, the done mark, then per bucket:
# minute, day, month counter. ARGV: id, tokens, USD, seconds the mark is kept. Day and month are added to
# only once seeded (else the seed would be lost). Returns 1, or 0 when it was settled already.
SETTLE_SCRIPT = RELEASE + """
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[4])) then return 0 end
local rec = redis.call('GET', KEYS[2])
if rec then
  release(cjson.decode(rec))
  redis.call('DEL', KEYS[2])
end
redis.call('ZREM', KEYS[1], ARGV[1])
local tok, usd = tonumber(ARGV[2]), tonumber(ARGV[3])
for k = 4, #KEYS, 3 do
  if tok > 0 then
    redis.call('INCRBY', KEYS[k], tok)
    redis.call('EXPIRE', KEYS[k], 120)
  end
  if usd > 0 then
    if redis.call('EXISTS', KEYS[k + 1]) == 1 then redis.call('INCRBYFLOAT', KEYS[k + 1], usd) end
    if redis.call('EXISTS', KEYS[k + 2]) == 1 then redis.call('INCRBYFLOAT', KEYS[k + 2], usd) end
  end
end
return 1
"""


class SharedSpend:
    """Spend windows in Redis; the in-memory ledger keeps counting too, for the fail-open fallback.

    Every answer's spend reaches Redis, also when Redis could not take it at once: a settle that failed is
    kept and sent again before the next reservation (SETTLE_SCRIPT counts it once), and a reservation that
    fell back to this process's counters is settled in Redis as well (its script may have run there with
    the answer lost to a timeout: the settle drops what it holds). Spend only one process knew of would let
    the others spend it again."""

    def __init__(self, shared: SharedState, spent_so_far: Callable[[str], Awaitable[tuple[float, float]]],
                 reservation_seconds: float = 900.0) -> None:
        self.shared = shared
        self.local = LocalSpend(spent_so_far)
        self.sync_ledger: SpendLedger | None = None  # never without an ``await``: the windows are in Redis
        self.spent_so_far = spent_so_far
        self.reservation_seconds = reservation_seconds
        self.names = SpendKeys(shared.prefix)
        self._count = 0
        # settles Redis did not take yet: (give up after, KEYS, ARGV); bounded, oldest dropped first
        self.unsettled: deque[tuple[float, list[str], list[str | int | float]]] = deque(maxlen=100_000)
        self._done_mark_seconds = math.ceil(reservation_seconds) + 3600

    def reserve_now(self, limited: tuple[tuple[str, Limits], ...], ask: Ask) -> None:
        """Never without an ``await`` here: the windows are in Redis (:meth:`reserve`)."""
        return None

    async def reserve(self, limited: tuple[tuple[str, Limits], ...], ask: Ask, family: str) -> Grant | Exhausted:
        """One script over every limited window of the key and its ancestors (RESERVE_SCRIPT); ``family``
        is the root key of the chain: every name the script touches is in its hash slot."""
        now = time.time()
        self._count += 1
        grant_id = f"{self.shared.origin}-{self._count}"
        keys = [self.names.queue(family), self.names.record(family, grant_id)]
        args: list[str | int | float] = [self.names.script_prefix(family), grant_id,
                                         math.ceil(self.reservation_seconds), ask.prompt_tokens,
                                         repr(ask.prompt_usd), ask.output_tokens, repr(ask.output_usd_per_token),
                                         ask.choices if ask.clamp else 0]  # clamp: to a token per choice
        for bucket, limits in limited:
            keys += [*self.names.windows(family, bucket, now), *self.names.reserved(family, bucket)]
            args += [-1 if x is None else repr(float(x)) for x in
                     (limits.tokens_per_minute, limits.cost_per_day_usd, limits.budget_per_month_usd)]

        async def in_redis() -> Grant | Exhausted:
            if self.unsettled:
                await self.send_unsettled()  # what earlier answers spent counts before this reservation
            for _attempt in range(len(limited) + 1):
                raw = await self.shared._reserve(keys=keys, args=args)
                verdict = int(raw[0])
                if verdict == -1:  # a day/month window not seeded yet: seed it from the store, try again
                    await self._seed(family, limited[int(raw[1])][0], now)
                    continue
                if verdict == 1:
                    return Grant(grant_id, tuple(b for b, _ in limited), ask.prompt_tokens + int(raw[1]),
                                 ask.prompt_usd + int(raw[1]) * ask.output_usd_per_token, int(raw[1]), local=False,
                                 family=family)
                window = int(raw[1])
                limit = getattr(limited[window // 3][1], WINDOW_NAMES[window % 3])
                used = float(raw[2].decode() if isinstance(raw[2], bytes) else raw[2])
                name = WINDOW_NAMES[window % 3]
                resets = {0: (now // 60 + 1) * 60.0, 1: day_end(now), 2: month_end(now)}[window % 3]
                return Exhausted(name, limit, used, resets, max(0.0, limit - used))
            raise RedisError("spend windows could not be seeded")

        async def locally() -> Grant | Exhausted:
            found = await self.local.reserve(limited, ask, family)
            if isinstance(found, Grant):  # settled in Redis too, under the id the script may have used
                found.id, found.family = grant_id, family
            return found

        return await self.shared.call(in_redis, None if self.shared.fail_closed else locally)

    async def settle(self, grant: Grant, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        """Drop the reservation and count the answer, atomically (SETTLE_SCRIPT). Idempotent."""
        if grant.done:
            return
        if grant.local:  # reserved in this process's ledger: Redis was unreachable or too slow
            await self.local.settle(grant, buckets, tokens, cost_usd)
        else:
            grant.done = True
            self.local.ledger.add(buckets, tokens, cost_usd)  # kept warm for the fail-open fallback
        now = time.time()
        family = grant.family or buckets[-1]
        keys = [self.names.queue(family), self.names.record(family, str(grant.id)),
                self.names.settled(family, str(grant.id))]
        for bucket in buckets:
            keys += self.names.windows(family, bucket, now)
        args: list[str | int | float] = [str(grant.id), tokens, repr(cost_usd), self._done_mark_seconds]

        async def in_redis() -> None:
            if self.unsettled:
                await self.send_unsettled()
            await self.shared._settle(keys=keys, args=args)

        async def later() -> None:
            # Sent again before the next reservation; given up once its done mark would have expired.
            self.unsettled.append((time.monotonic() + self._done_mark_seconds - 600, keys, args))

        if grant.local and not self.shared.up:
            await later()  # Redis just failed this request's reservation: no second wait before its last byte
            return
        await self.shared.call(in_redis, later)

    async def send_unsettled(self, at_most: int = 100) -> None:
        """Settles Redis did not take when they were made, oldest first; each is removed once Redis took it.
        At most ``at_most`` per call: after an outage, the backlog is spread over the next requests."""
        for _ in range(at_most):
            if not self.unsettled:
                return
            item = self.unsettled.popleft()  # taken first: two requests draining at once send each one once
            give_up, keys, args = item
            if time.monotonic() >= give_up:
                log.warning("a settle Redis did not take for %.0f s was dropped: the reservation expired, and "
                            "the usage event counts in the next seed of the window", self._done_mark_seconds)
                continue
            try:
                await self.shared._settle(keys=keys, args=args)
            except BaseException:
                self.unsettled.appendleft(item)
                raise

    async def current(self, bucket: str, family: str | None = None
                      ) -> tuple[tuple[float, float, float], tuple[float, float]]:
        """(settled tokens this minute, USD today, USD this month), (reserved tokens, reserved USD).
        ``family``: the root key of ``bucket``'s chain (default: ``bucket`` is a root)."""
        now = time.time()
        family = family or bucket

        async def in_redis() -> tuple[tuple[float, float, float], tuple[float, float]]:
            minute, day, month, tok, usd = await self.shared.client.mget(
                *self.names.windows(family, bucket, now), *self.names.reserved(family, bucket))
            if day is None or month is None:
                day, month = await self._seed(family, bucket, now)
            return ((float(minute or 0), float(day or 0), float(month or 0)),
                    (max(0.0, float(tok or 0)), max(0.0, float(usd or 0))))

        async def locally() -> tuple[tuple[float, float, float], tuple[float, float]]:
            return await self.local.current(bucket)

        return await self.shared.call(in_redis, locally)

    async def reserved(self, bucket: str, family: str | None = None) -> tuple[float, float]:
        """(tokens, USD) held by reservations not yet settled, across every process."""

        async def in_redis() -> tuple[float, float]:
            tok, usd = await self.shared.client.mget(*self.names.reserved(family or bucket, bucket))
            return max(0.0, float(tok or 0)), max(0.0, float(usd or 0))

        async def locally() -> tuple[float, float]:
            return self.local.ledger.reserved(bucket)

        return await self.shared.call(in_redis, locally)

    async def _seed(self, family: str, bucket: str, now: float) -> tuple[bytes, bytes]:
        """First use of a day/month window anywhere: start it from what the store already recorded."""
        day_usd, month_usd = await self.spent_so_far(bucket)
        _minute, day_key, month_key = self.names.windows(family, bucket, now)
        pipe = self.shared.spend_client.pipeline(transaction=False)
        pipe.set(day_key, repr(day_usd), nx=True, ex=2 * 86400)
        pipe.set(month_key, repr(month_usd), nx=True, ex=40 * 86400)
        pipe.mget(day_key, month_key)
        results = await pipe.execute()
        return results[-1][0], results[-1][1]

    async def add(self, buckets: tuple[str, ...], tokens: int, cost_usd: float) -> None:
        """Called after the answer went out: costs the client nothing, and is counted before the next check."""
        if not tokens and not cost_usd:
            return
        await self.local.add(buckets, tokens, cost_usd)
        now = time.time()

        async def in_redis() -> None:
            pipe = self.shared.client.pipeline(transaction=False)
            seeded: list[str] = []
            for bucket in buckets:
                minute_key, day_key, month_key = self.names.windows(buckets[-1], bucket, now)
                if tokens:
                    pipe.incrby(minute_key, tokens)
                    pipe.expire(minute_key, 120)
                seeded += [day_key, month_key]
            await pipe.execute()
            if cost_usd:
                await self.shared._add_if_seeded(keys=seeded, args=[repr(cost_usd)])

        async def skip() -> None:
            return None  # counted locally above; the store has the usage event for the next seed

        await self.shared.call(in_redis, skip)


