"""``last_used_at`` and request counts, kept in memory and written in batches off the request path."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

log = logging.getLogger("keyplane.usage")


class LastUsedTracker:
    def __init__(self) -> None:
        # key id -> (last used, requests since the last flush)
        self._pending: dict[str, tuple[float, int]] = {}
        self._seen: dict[str, float] = {}

    def touch(self, key_id: str, now: float) -> None:
        _last, count = self._pending.get(key_id, (0.0, 0))
        self._pending[key_id] = (now, count + 1)

    def last_used(self, key_id: str) -> float | None:
        """What this process knows, flushed or not (the store may know a later time from elsewhere)."""
        pending = self._pending.get(key_id)
        if pending is not None:
            return pending[0]
        return self._seen.get(key_id)

    def take(self) -> dict[str, tuple[float, int]]:
        batch, self._pending = self._pending, {}
        for key_id, (at, _count) in batch.items():
            self._seen[key_id] = at
        if len(self._seen) > 200_000:
            self._seen.clear()
        return batch

    def restore(self, batch: dict[str, tuple[float, int]]) -> None:
        """Put an unwritten batch back (the store was unreachable); newer touches win."""
        for key_id, (at, count) in batch.items():
            last, pending = self._pending.get(key_id, (0.0, 0))
            self._pending[key_id] = (max(at, last), count + pending)

    async def flush(self, write: Callable[[dict[str, tuple[datetime, int]]], Awaitable[None]]) -> int:
        from datetime import UTC

        batch = self.take()
        if not batch:
            return 0
        try:
            await write({k: (datetime.fromtimestamp(at, UTC), n) for k, (at, n) in batch.items()})
        except Exception:
            log.exception("could not write last-used times for %d keys; will retry", len(batch))
            self.restore(batch)
            return 0
        return len(batch)
