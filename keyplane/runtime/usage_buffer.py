"""Usage events wait here, bounded, and leave in batches (at least every second and on shutdown).

A record the store refuses never holds the others back: the batch is split until the refused record
stands alone, which is then written sanitised or, failing that, quarantined (dropped and counted).
Only an unreachable store puts a batch back to be retried.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from keyplane.domain import usage_row
from keyplane.domain.storable import INT32_MAX, INT32_MIN, storable_int, storable_text
from keyplane.store.models import UsageEvent

log = logging.getLogger("keyplane.usage")

# The store is down or busy (not this batch's fault): keep the batch and retry it later.
STORE_UNREACHABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, DisconnectionError,
                                                  ConnectionError, TimeoutError)

# SQLSTATE classes that say the same: connection (08), resources (53), operator intervention (57: an admin
# shutdown or a restart in progress), system (58), transaction rollback (40: serialization, deadlock).
_RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def store_unreachable(exc: BaseException) -> bool:
    """Is this the store's state rather than the batch's content? Then the batch is kept, never split."""
    if isinstance(exc, STORE_UNREACHABLE):
        return True
    seen: BaseException | None = exc
    for _ in range(4):  # SQLAlchemy's error -> the driver adapter's -> the driver's own (asyncpg: .sqlstate)
        if seen is None:
            break
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str) and state[:2] in _RETRYABLE_SQLSTATE_CLASSES:
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


# Column bounds, read from the model so they cannot drift from the table, by a row's field positions
# (keyplane.domain.usage_row).
_ROW_TEXT = tuple((usage_row.FIELDS.index(c.name), c.type.length) for c in UsageEvent.__table__.columns
                  if isinstance(c.type, String))
_ROW_INTS = tuple(usage_row.FIELDS.index(c.name) for c in UsageEvent.__table__.columns
                  if isinstance(c.type, Integer) and not c.primary_key)

Event = usage_row.Row
Write = Callable[[list[Event]], Awaitable[None]]


def storable_row(row: usage_row.Row) -> usage_row.Row:
    """The row with every text and integer field made storable (see ``keyplane.domain.storable``): the
    same tuple when nothing needed changing (the usual case, on every request), else a changed copy."""
    clean: list[Any] | None = None
    for i, limit in _ROW_TEXT:
        value = row[i]
        if value.__class__ is str and not (value.isascii() and "\x00" not in value
                                           and (limit is None or len(value) <= limit)):
            fixed = storable_text(value, limit)
            if fixed is not value:
                if clean is None:
                    clean = list(row)
                clean[i] = fixed
    for i in _ROW_INTS:
        value = row[i]
        if value.__class__ is int and not INT32_MIN <= value <= INT32_MAX:
            if clean is None:
                clean = list(row)
            clean[i] = storable_int(value)
    return row if clean is None else tuple(clean)


class UsageBuffer:
    def __init__(self, max_events: int = 100_000) -> None:
        self.max_events = max_events
        self._events: list[Event] = []
        self.dropped = 0  # since start: also exported as a metric
        self._dropped_unreported = 0
        self.written = 0
        self.sanitised = 0  # events whose text or numbers were changed to be storable
        self.quarantined = 0  # events the store refused even sanitised: dropped, counted, logged

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: Event | dict[str, Any]) -> None:
        """A row (``usage_row.FIELDS`` order), as the gateways record them; a dict event (tests, backfills: the
        column names as keys) becomes one here (``usage_row.row_of``), so the buffer holds rows only."""
        if len(self._events) >= self.max_events:
            self.dropped += 1
            self._dropped_unreported += 1
            return
        if event.__class__ is not tuple:
            event = usage_row.row_of(event)  # type: ignore[arg-type]
        clean = storable_row(event)  # type: ignore[arg-type]
        if clean is not event:
            self.sanitised += 1
        self._events.append(clean)

    def take(self) -> list[Event]:
        if self._dropped_unreported:
            log.warning("usage buffer full: %d events dropped (store slow or unreachable)", self._dropped_unreported)
            self._dropped_unreported = 0
        batch, self._events = self._events, []
        return batch

    def restore(self, batch: list[Event]) -> None:
        """Put back a batch the store could not take, oldest first, within the bound."""
        room = self.max_events - len(self._events)
        kept = batch[:room] if room > 0 else []
        lost = len(batch) - len(kept)
        if lost:
            self.dropped += lost
            self._dropped_unreported += lost
        self._events = kept + self._events

    async def flush(self, write: Write) -> int:
        """Write what is waiting; returns how many events were written."""
        batch = self.take()
        if not batch:
            return 0
        written = await self._write(write, batch)
        self.written += written
        return written

    async def _write(self, write: Write, batch: list[Event]) -> int:
        try:
            await write(batch)
            return len(batch)
        except Exception as exc:
            if store_unreachable(exc):
                log.exception("could not write %d usage events; will retry", len(batch))
                self.restore(batch)
                return 0
            if len(batch) == 1:
                return await self._write_alone(write, batch[0], exc)
        # Some record in this batch is refused: halve until it stands alone (log2(n) extra writes each).
        middle = len(batch) // 2
        return await self._write(write, batch[:middle]) + await self._write(write, batch[middle:])

    async def _write_alone(self, write: Write, event: Event, exc: Exception) -> int:
        if event.__class__ is not tuple:  # a dict put in the queue past add()
            event = usage_row.row_of(event)  # type: ignore[arg-type]
        clean = storable_row(event)
        if clean is not event:
            try:
                await write([clean])
                self.sanitised += 1
                return 1
            except Exception as again:
                if store_unreachable(again):
                    self.restore([clean])
                    return 0
                exc = again
        self.quarantined += 1
        log.error("usage event quarantined: the store refused it (%s); key %s, endpoint %s",
                  type(exc).__name__, event[usage_row.KEY_ID], str(event[usage_row.ENDPOINT])[:100])
        return 0
