"""A key's spend windows right now: what is settled, what requests in flight hold reserved, what is left."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain.errors import not_found
from keyplane.runtime.spend import day_end, month_end
from keyplane.services.keys import MAX_SUBKEY_DEPTH
from keyplane.services.limit_profiles import limits_of
from keyplane.services.principal import Principal
from keyplane.store.db import Database
from keyplane.store.models import LimitProfile, VirtualKey


class SpendCounters(Protocol):
    async def current(self, bucket: str, family: str | None = None
                      ) -> tuple[tuple[float, float, float], tuple[float, float]]: ...


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def _root_of(s: AsyncSession, key: VirtualKey) -> str:
    """The root of the key's chain: its spend windows are kept under that family (runtime/spend_keys.py)."""
    root, parent_id = key.id, key.parent_id
    for _ in range(MAX_SUBKEY_DEPTH):
        if parent_id is None:
            break
        root = parent_id
        parent_id = (await s.execute(select(VirtualKey.parent_id).where(VirtualKey.id == parent_id))).scalar()
    return root


class SpendStatusService:
    def __init__(self, db: Database, counters: SpendCounters) -> None:
        self.db = db
        self.counters = counters

    async def current(self, principal: Principal, key_id: str) -> dict[str, Any]:
        """This key's own windows (its sub-keys' spend is counted in them too), settled vs reserved."""
        principal.require("usage:read")
        async with self.db.read() as s:
            q = (select(VirtualKey, LimitProfile)
                 .outerjoin(LimitProfile, LimitProfile.id == VirtualKey.limit_profile_id)
                 .where(VirtualKey.id == key_id, VirtualKey.org_id == principal.org_id,
                        VirtualKey.status != "deleted"))
            found = (await s.execute(q)).first()
            if found is None:
                raise not_found("key", key_id)
            family = await _root_of(s, found[0])
        limits = limits_of(found[1])
        now = time.time()
        (tokens, day, month), (held_tokens, held_usd) = await self.counters.current(key_id, family)
        windows = []
        for name, limit, settled, reserved, resets in (
            ("tokens_per_minute", limits.tokens_per_minute, tokens, held_tokens, (now // 60 + 1) * 60.0),
            ("cost_per_day_usd", limits.cost_per_day_usd, day, held_usd, day_end(now)),
            ("budget_per_month_usd", limits.budget_per_month_usd, month, held_usd, month_end(now)),
        ):
            windows.append({"limit": name, "value": limit, "settled": round(settled, 9),
                            "reserved": round(reserved, 9),
                            "remaining": None if limit is None else round(max(0.0, limit - settled - reserved), 9),
                            "resets_at": _iso(resets)})
        return {"key_id": key_id, "windows": windows}
