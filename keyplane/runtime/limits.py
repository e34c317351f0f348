"""In-process enforcement state: GCRA buckets, the failed-authentication brake, the replay window."""

from __future__ import annotations

import time
from collections.abc import Sequence

from keyplane.domain import gcra
from keyplane.domain.errors import KeyplaneError


class LimitsUnavailable(Exception):
    """Shared limit state (Redis) is down and the fail mode is ``closed``."""


def limits_unavailable() -> KeyplaneError:
    return KeyplaneError(503, "limits_unavailable",
                         "Rate limits cannot be checked right now (shared state unreachable); retry shortly",
                         headers={"Retry-After": "1"})


class MemoryRateLimiter:
    """GCRA buckets in a dict. Every decision runs without an ``await``, so it is atomic under asyncio."""

    def __init__(self, max_buckets: int = 1_000_000) -> None:
        self._tat: dict[str, float] = {}
        self.max_buckets = max_buckets

    async def acquire(self, buckets: Sequence[tuple[str, int]], now: float | None = None) -> gcra.Verdict | None:
        """Admit one request through every ``(bucket id, per-minute limit)``, or through none of them."""
        if not buckets:
            return None
        now = time.time() if now is None else now
        verdict: gcra.Verdict | None = None
        updates: list[tuple[str, float]] = []
        for bucket, limit in buckets:
            v, new_tat = gcra.decide(self._tat.get(bucket), now, limit)
            verdict = v if verdict is None else gcra.tighter(verdict, v)
            if new_tat is not None:
                updates.append((bucket, new_tat))
        assert verdict is not None
        if verdict.allowed:
            for bucket, new_tat in updates:
                self._tat[bucket] = new_tat
            if len(self._tat) > self.max_buckets:
                self.prune(now)
        return verdict

    def prune(self, now: float) -> None:
        """Buckets whose TAT has passed are full again: forgetting them changes nothing."""
        self._tat = {k: v for k, v in self._tat.items() if v > now}


class FailureBrake:
    """Too many failed authentications from one client IP within a minute block that IP for a while."""

    def __init__(self, max_failures: int, block_seconds: float, window: float = 60.0) -> None:
        self.max_failures = max_failures
        self.block_seconds = block_seconds
        self.window = window
        self._failures: dict[str, tuple[float, int]] = {}  # ip -> (window start, count)
        self._blocked: dict[str, float] = {}  # ip -> blocked until
        self.blocks = 0

    def blocked_for(self, ip: str, now: float) -> float:
        until = self._blocked.get(ip)
        if until is None:
            return 0.0
        if until <= now:
            del self._blocked[ip]
            return 0.0
        return until - now

    def block(self, ip: str, now: float, seconds: float | None = None) -> None:
        """Refuse ``ip`` for a while (another process's verdict, in distributed mode)."""
        self._blocked[ip] = now + (self.block_seconds if seconds is None else seconds)

    def fail(self, ip: str, now: float) -> None:
        start, count = self._failures.get(ip, (now, 0))
        if now - start > self.window:
            start, count = now, 0
        count += 1
        self._failures[ip] = (start, count)
        if count >= self.max_failures:
            self._blocked[ip] = now + self.block_seconds
            self._failures.pop(ip, None)
            self.blocks += 1
        if len(self._failures) > 100_000:
            self._failures = {k: v for k, v in self._failures.items() if now - v[0] <= self.window}


class ReplayWindow:
    """Signatures seen within the timestamp window; a second use is a replay."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._seen: dict[str, float] = {}
        self._next_prune = 0.0

    async def first_use(self, signature: str, now: float) -> bool:
        if now >= self._next_prune:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            self._next_prune = now + 10
        expires = self._seen.get(signature)
        if expires is not None and expires > now:
            return False
        self._seen[signature] = now + self.ttl
        return True
