"""Usage events wait here, bounded, and leave in batches (at least every second and on shutdown)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("keyplane.usage")


class UsageBuffer:
    def __init__(self, max_events: int = 100_000) -> None:
        self.max_events = max_events
        self._events: list[dict[str, Any]] = []
        self.dropped = 0  # since start: also exported as a metric
        self._dropped_unreported = 0
        self.written = 0

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: dict[str, Any]) -> None:
        if len(self._events) >= self.max_events:
            self.dropped += 1
            self._dropped_unreported += 1
            return
        self._events.append(event)

    def take(self) -> list[dict[str, Any]]:
        if self._dropped_unreported:
            log.warning("usage buffer full: %d events dropped (store slow or unreachable)", self._dropped_unreported)
            self._dropped_unreported = 0
        batch, self._events = self._events, []
        return batch

    def restore(self, batch: list[dict[str, Any]]) -> None:
        """Put back a batch the store refused, oldest first, within the bound."""
        room = self.max_events - len(self._events)
        kept = batch[:room] if room > 0 else []
        lost = len(batch) - len(kept)
        if lost:
            self.dropped += lost
            self._dropped_unreported += lost
        self._events = kept + self._events
