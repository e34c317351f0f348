"""The failed-authentication brake across processes: failures counted in Redis, blocks broadcast."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from keyplane.runtime.limits import FailureBrake

if TYPE_CHECKING:
    from keyplane.runtime.shared.state import SharedState

from keyplane.runtime.shared.change_bus import ChangeBus


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
