"""Distributed mode: what must hold across processes lives in Redis.

- GCRA request limits: one Lua script decides every bucket of a request (a sub-key and its parents)
  atomically, on Redis's clock, so N processes admit exactly what one would.
- Spend counters: tokens per minute, cost per UTC day and month, seeded once from the store.
- The failed-authentication brake: failures are counted in Redis; a block is broadcast, so the
  check on the hot path stays in memory.
- The signature replay window: ``SET NX`` on the signature.
- Change notices: every cache invalidation is published on one channel; every process drops its
  copy. The audit-log poll (and the cache TTL) remain the backstop for a lost message.

When Redis is unreachable, authentication carries on from cache and store, and limits follow
``KEYPLANE_REDIS_FAIL_MODE``: ``open`` (default) falls back to each process's own in-memory limits,
``closed`` refuses limited requests with 503. Every transition is logged loudly and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from keyplane.domain import gcra
from keyplane.domain.policy import Limits
from keyplane.runtime.limits import FailureBrake, LimitsUnavailable, MemoryRateLimiter, ReplayWindow
from keyplane.runtime.spend import Exhausted, LocalSpend, day_end, month_end, windows

log = logging.getLogger("keyplane.redis")
T = TypeVar("T")


# A batch of requests, decided in order as if each had its own call (so concurrent requests of one process
# cost one round trip). KEYS: the buckets of every request, flattened. ARGV: for each request, its bucket
# count and then each bucket's limit per minute. Each request passes through all its buckets or none (a
# sub-key and its parents), on Redis's clock. Returns, per request, {allowed, limit, remaining, reset_after,
# retry_after} of its tightest bucket, as strings (Lua numbers would be truncated to integers).
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local k = 1
local a = 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local best = nil
  local news = {}
  for i = 0, n - 1 do
    local limit = tonumber(ARGV[a + 1 + i])
    local interval = 60.0 / limit
    local tat = tonumber(redis.call('GET', KEYS[k + i]) or '0')
    local current = now
    if tat > now then current = tat end
    local new_tat = current + interval
    local allow_at = new_tat - limit * interval
    local v
    if allow_at > now then
      v = {0, limit, 0, current - now, allow_at - now}
    else
      local remaining = math.min(limit - 1, math.floor((now - allow_at) / interval + 1e-9))
      v = {1, limit, remaining, new_tat - now, 0}
      news[i] = new_tat
    end
    if best == nil then best = v
    elseif best[1] ~= v[1] then
      if v[1] == 0 then best = v end
    elseif v[1] == 0 then
      if v[5] > best[5] then best = v end
    elseif v[3] < best[3] then best = v end
  end
  if best[1] == 1 then
    for i = 0, n - 1 do
      redis.call('SET', KEYS[k + i], string.format('%.6f', news[i]), 'PX',
                 math.ceil((news[i] - now) * 1000) + 1000)
    end
  end
  out[#out + 1] = tostring(best[1])
  out[#out + 1] = tostring(best[2])
  out[#out + 1] = tostring(best[3])
  out[#out + 1] = string.format('%.6f', best[4])
  out[#out + 1] = string.format('%.6f', best[5])
  k = k + n
  a = a + 1 + n
end
return out
"""

# Adds to a day or month counter only once it has been seeded from the store (else the seed would be lost).
ADD_IF_SEEDED = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBYFLOAT', KEYS[i], ARGV[1]) end
end
return 1
"""


class SharedState:
    """One Redis connection pool for the process, its health, and the fallbacks it falls back to."""

    def __init__(self, url: str, *, fail_mode: str = "open", timeout: float = 1.0,
                 namespace: str = "keyplane", max_connections: int = 32) -> None:
        self.prefix = namespace + ":"  # every key, and the channel: several deployments may share one Redis
        self.channel = namespace + ":changes"
        # A bounded pool: a burst of requests queues for a connection instead of opening hundreds.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, health_check_interval=5)
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self.fail_closed = fail_mode == "closed"
        self.origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.up = True
        self.errors = 0
        self.fallbacks = 0
        self._last_loud = 0.0
        self._gcra = self.client.register_script(GCRA_SCRIPT)
        self._add_if_seeded = self.client.register_script(ADD_IF_SEEDED)

    async def call(self, op: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]] | None) -> T:
        """Run a Redis operation; on failure count it, log it, and use ``fallback`` (or raise)."""
        try:
            result = await op()
        except (TimeoutError, RedisError, OSError) as exc:
            self.failed(exc)
            if fallback is None:
                raise LimitsUnavailable from exc
            self.fallbacks += 1
            return await fallback()
        self.recovered()
        return result

    def recovered(self) -> None:
        if not self.up:
            self.up = True
            log.warning("redis reachable again: shared limits and change notices resumed")

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if self.up or now - self._last_loud > 30:
            mode = "refusing limited requests (fail_closed)" if self.fail_closed else \
                "limits fall back to this process's own counters (fail_open)"
            log.error("redis unreachable (%s): authentication continues from cache and store; %s",
                      type(exc).__name__, mode)
            self._last_loud = now
        self.up = False

    async def close(self) -> None:
        await self.client.aclose()


class SharedRateLimiter:
    """GCRA buckets in Redis, falling back to (or refusing without) a per-process limiter.

    Requests that arrive while a call is in flight wait for the next one, which decides them all in a
    single script run: under load one round trip serves a whole batch, at one request's latency.
    """

    MAX_BATCH = 256

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.local = MemoryRateLimiter()
        self._queue: list[tuple[list[str], list[int], asyncio.Future[gcra.Verdict]]] = []
        self._running = False

    async def acquire(self, buckets: Sequence[tuple[str, int]], now: float | None = None) -> gcra.Verdict | None:
        if not buckets:
            return None
        fut: asyncio.Future[gcra.Verdict] = asyncio.get_running_loop().create_future()
        self._queue.append(([f"{self.shared.prefix}rl:{b}" for b, _ in buckets], [limit for _, limit in buckets], fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        try:
            return await fut
        except _RedisDown:
            if self.shared.fail_closed:
                raise LimitsUnavailable from None
            self.shared.fallbacks += 1
            return await self.local.acquire(buckets, now)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.MAX_BATCH], self._queue[self.MAX_BATCH:]
                await self._decide(batch)
        finally:
            self._running = False

    async def _decide(self, batch: list[tuple[list[str], list[int], asyncio.Future[gcra.Verdict]]]) -> None:
        keys: list[str] = []
        args: list[int] = []
        for bucket_keys, limits, _ in batch:
            keys += bucket_keys
            args += [len(limits), *limits]
        try:
            raw = await self.shared._gcra(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.shared.failed(exc)
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(_RedisDown())
            return
        except BaseException as exc:  # never leave a request waiting
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            raise
        self.shared.recovered()
        values = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
        for i, (_, _, fut) in enumerate(batch):
            allowed, limit, remaining, reset_after, retry_after = values[5 * i: 5 * i + 5]
            if not fut.done():
                fut.set_result(gcra.Verdict(allowed == "1", int(limit), int(remaining), float(reset_after),
                                            float(retry_after)))


class _RedisDown(Exception):
    pass


class SharedSpend:
    """Spend windows in Redis; the in-memory ledger keeps counting too, for the fail-open fallback."""

    def __init__(self, shared: SharedState, spent_so_far: Callable[[str], Awaitable[tuple[float, float]]]) -> None:
        self.shared = shared
        self.local = LocalSpend(spent_so_far)
        self.spent_so_far = spent_so_far

    def _keys(self, bucket: str, now: float) -> tuple[str, str, str]:
        minute, day, month = windows(now)
        p = self.shared.prefix
        return f"{p}sp:{bucket}:m:{minute}", f"{p}sp:{bucket}:d:{day}", f"{p}sp:{bucket}:M:{month}"

    async def check(self, buckets: tuple[tuple[str, Limits], ...]) -> Exhausted | None:
        now = time.time()

        async def in_redis() -> Exhausted | None:
            keys = [k for bucket, _ in buckets for k in self._keys(bucket, now)]
            values = await self.shared.client.mget(keys)
            for i, (bucket, limits) in enumerate(buckets):
                minute_used, day_spent, month_spent = values[3 * i: 3 * i + 3]
                if day_spent is None or month_spent is None:
                    day_spent, month_spent = await self._seed(bucket, now)
                used = int(minute_used or 0)
                day_v, month_v = float(day_spent), float(month_spent)
                if limits.tokens_per_minute is not None and used >= limits.tokens_per_minute:
                    return Exhausted("tokens_per_minute", limits.tokens_per_minute, used, (now // 60 + 1) * 60.0)
                if limits.cost_per_day_usd is not None and day_v >= limits.cost_per_day_usd:
                    return Exhausted("cost_per_day_usd", limits.cost_per_day_usd, day_v, day_end(now))
                if limits.budget_per_month_usd is not None and month_v >= limits.budget_per_month_usd:
                    return Exhausted("budget_per_month_usd", limits.budget_per_month_usd, month_v, month_end(now))
            return None

        async def locally() -> Exhausted | None:
            return await self.local.check(buckets)

        return await self.shared.call(in_redis, None if self.shared.fail_closed else locally)

    async def _seed(self, bucket: str, now: float) -> tuple[bytes, bytes]:
        """First use of a day/month window anywhere: start it from what the store already recorded."""
        day_usd, month_usd = await self.spent_so_far(bucket)
        _minute, day_key, month_key = self._keys(bucket, now)
        pipe = self.shared.client.pipeline(transaction=False)
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
                minute_key, day_key, month_key = self._keys(bucket, now)
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


class SharedReplayWindow:
    def __init__(self, shared: SharedState, ttl: float) -> None:
        self.shared = shared
        self.ttl = ttl
        self.local = ReplayWindow(ttl)

    async def first_use(self, signature: str, now: float) -> bool:
        async def in_redis() -> bool:
            return bool(await self.shared.client.set(f"{self.shared.prefix}rp:{signature}", b"1", nx=True,
                                                     ex=math.ceil(self.ttl)))

        async def locally() -> bool:
            return await self.local.first_use(signature, now)

        return await self.shared.call(in_redis, locally)


class ChangeBus:
    """Publishes this process's cache invalidations and applies everyone else's.

    Messages are ``{"o": origin, "k": kind, "t": target}`` with kind ``key``, ``service_account``,
    ``new_secret``, ``all`` or ``brake`` (target ``ip|seconds``).
    """

    def __init__(self, shared: SharedState, apply: Callable[[str, str], None]) -> None:
        self.shared = shared
        self.apply = apply
        self.pending: list[bytes] = []
        self._wake = asyncio.Event()
        self.received = 0
        self.connected = asyncio.Event()
        self.stopped = False

    def publish(self, kind: str, target: str) -> None:
        self.pending.append(orjson.dumps({"o": self.shared.origin, "k": kind, "t": target}))
        with contextlib.suppress(RuntimeError):  # no running loop (a CLI between jobs): flush() sends it
            asyncio.get_running_loop().call_soon(self._wake.set)

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return

        async def send() -> None:
            pipe = self.shared.client.pipeline(transaction=False)
            for message in batch:
                pipe.publish(self.shared.channel, message)
            await pipe.execute()

        async def dropped() -> None:
            # Lost notices are caught by the audit-log poll and the cache TTL.
            log.warning("could not publish %d change notice(s); other processes catch up by polling", len(batch))

        await self.shared.call(send, dropped)

    async def run_publisher(self) -> None:
        # Checks a flag as well as cancellation: redis-py can swallow a CancelledError mid-command.
        while not self.stopped:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    def stop(self) -> None:
        self.stopped = True
        self._wake.set()

    async def run_subscriber(self) -> None:
        """Listen until stopped. After a reconnect, drop everything: notices may have been missed."""
        first = True
        delay = 0.1
        while not self.stopped:
            pubsub = self.shared.client.pubsub()
            try:
                await pubsub.subscribe(self.shared.channel)
                while not self.stopped:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":  # the server confirmed: we are listening
                        if not first:
                            self.apply("all", "")
                            log.warning("change notices resumed; caches dropped in case some were missed")
                        first = False
                        delay = 0.1
                        self.connected.set()
                        self.shared.recovered()
                    elif message.get("type") == "message":
                        self._handle(message["data"])
            except asyncio.CancelledError:
                raise
            except (TimeoutError, RedisError, OSError) as exc:
                self.connected.clear()
                self.shared.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _handle(self, data: bytes) -> None:
        try:
            message: dict[str, Any] = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if message.get("o") == self.shared.origin:
            return
        self.received += 1
        self.apply(str(message.get("k", "all")), str(message.get("t", "")))


class SharedBrake(FailureBrake):
    """The in-memory brake, with failures counted in Redis and blocks broadcast to every process."""

    def __init__(self, shared: SharedState, max_failures: int, block_seconds: float) -> None:
        super().__init__(max_failures, block_seconds)
        self.shared = shared
        self.bus: ChangeBus | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def fail(self, ip: str, now: float) -> None:
        super().fail(ip, now)  # this process blocks on its own count at once
        task = asyncio.get_running_loop().create_task(self._count(ip))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count(self, ip: str) -> None:
        async def in_redis() -> None:
            key = f"{self.shared.prefix}bf:{ip}"
            pipe = self.shared.client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, int(self.window), nx=True)
            count, _ = await pipe.execute()
            if int(count) >= self.max_failures:
                await self.shared.client.delete(key)
                self.block(ip, time.time())
                if self.bus is not None:
                    self.bus.publish("brake", f"{ip}|{self.block_seconds}")

        async def skip() -> None:
            return None

        await self.shared.call(in_redis, skip)
