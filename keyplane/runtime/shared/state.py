"""One Redis connection pool for the process, its health (up, errors, fallbacks), and the scripts it runs."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from keyplane.runtime.limits import LimitsUnavailable
from keyplane.runtime.shared.rate_limiter import GCRA_SCRIPT
from keyplane.runtime.shared.spend import ADD_IF_SEEDED, RESERVE_SCRIPT, SETTLE_SCRIPT

log = logging.getLogger("keyplane.redis")
T = TypeVar("T")


class SharedState:
    """One Redis connection pool for the process, its health, and the fallbacks it falls back to."""

    def __init__(self, url: str, *, fail_mode: str = "open", timeout: float = 1.0, spend_timeout: float = 5.0,
                 namespace: str = "keyplane", max_connections: int = 32) -> None:
        self.prefix = namespace + ":"  # every key, and the channel: several deployments may share one Redis
        self.channel = namespace + ":changes"
        # A bounded pool: a burst of requests queues for a connection instead of opening hundreds.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, health_check_interval=5)
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # Budget scripts wait longer, on a pool of their own: under CPU starvation an answer read a second late
        # is Redis slow, not Redis down, and falling back to this process's counters would let each process
        # spend the whole budget (docs/operations.md, "Failure modes").
        spend_pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=max(spend_timeout, timeout),
            socket_timeout=max(spend_timeout, timeout), socket_connect_timeout=timeout, health_check_interval=5)
        self.spend_client: aioredis.Redis = aioredis.Redis(connection_pool=spend_pool)
        self.fail_closed = fail_mode == "closed"
        self.origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.up = True
        self.errors = 0
        self.fallbacks = 0
        self._last_loud = 0.0
        self._gcra = self.client.register_script(GCRA_SCRIPT)
        self._add_if_seeded = self.spend_client.register_script(ADD_IF_SEEDED)
        self._reserve = self.spend_client.register_script(RESERVE_SCRIPT)
        self._settle = self.spend_client.register_script(SETTLE_SCRIPT)

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
        await self.spend_client.aclose()

