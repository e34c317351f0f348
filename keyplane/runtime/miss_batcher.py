"""Concurrent cache misses share store round trips.

When every request carries a different uncached key (a fleet starting up, a key-spraying client),
each miss used to take its own trip to the store, and the misses queued behind each other for the
few reader threads or connections. Here a miss joins a queue; up to ``max_in_flight`` loaders drain
it, each taking up to ``max_batch`` digests into ONE query. An idle store answers a lone miss at
once (the first loader starts immediately); a busy one answers the misses that piled up meanwhile
together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")


class MissBatcher(Generic[V]):
    def __init__(self, load_many: Callable[[Sequence[str]], Awaitable[dict[str, V | None]]], *,
                 max_batch: int = 256, max_in_flight: int = 4) -> None:
        self.load_many = load_many
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: list[tuple[str, asyncio.Future[V | None]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # store round trips made (a metric, and what the tests count)

    async def load(self, digest: str) -> V | None:
        fut: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._queue.append((digest, fut))
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                self.batches += 1
                try:
                    found = await self.load_many(list(dict.fromkeys(d for d, _ in batch)))
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                            fut.exception()  # mark retrieved: each waiter re-raises it itself
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for digest, fut in batch:
                    if not fut.done():
                        fut.set_result(found.get(digest))
        finally:
            self._in_flight -= 1
