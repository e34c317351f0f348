"""The signature replay window shared by every process: ``SET NX`` on the signature."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from keyplane.runtime.limits import ReplayWindow

if TYPE_CHECKING:
    from keyplane.runtime.shared.state import SharedState


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


