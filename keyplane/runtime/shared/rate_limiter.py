"""GCRA request limits in Redis: one Lua script decides every bucket of a batch of requests atomically."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from keyplane.domain import gcra
from keyplane.runtime.limits import LimitsUnavailable, MemoryRateLimiter

if TYPE_CHECKING:
    from keyplane.runtime.shared.state import SharedState


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


