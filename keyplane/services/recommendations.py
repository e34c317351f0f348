"""Limit recommendations from a key's real usage: the busiest minutes and days, with headroom."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC
from typing import Any

from sqlalchemy import select

from keyplane.domain.errors import not_found
from keyplane.services.audit import parse_since
from keyplane.services.principal import Principal
from keyplane.store.db import Database
from keyplane.store.models import LimitProfile, UsageEvent, VirtualKey

HEADROOM = 1.5


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class RecommendationService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def recommend(self, principal: Principal, key_id: str, window: str = "24h") -> dict[str, Any]:
        principal.require("usage:read")
        start = parse_since(window)
        async with self.db.read() as s:
            key = (await s.execute(select(VirtualKey).where(
                VirtualKey.id == key_id, VirtualKey.org_id == principal.org_id, VirtualKey.status != "deleted",
            ))).scalar_one_or_none()
            if key is None:
                raise not_found("key", key_id)
            profiles = list((await s.execute(select(LimitProfile).where(
                LimitProfile.org_id == principal.org_id))).scalars())
            current = next((p.name for p in profiles if p.id == key.limit_profile_id), None)
            rows = (await s.execute(select(
                UsageEvent.time, UsageEvent.status, UsageEvent.input_tokens, UsageEvent.output_tokens,
                UsageEvent.cost_usd,
            ).where(UsageEvent.key_id == key_id, UsageEvent.time >= start))).all()

        per_minute: Counter[str] = Counter()
        tokens_per_minute: Counter[str] = Counter()
        cost_per_day: defaultdict[str, float] = defaultdict(float)
        errors = 0
        for at, status, tin, tout, cost in rows:
            t = at.astimezone(UTC)
            minute = t.strftime("%Y-%m-%dT%H:%M")
            per_minute[minute] += 1
            tokens_per_minute[minute] += tin + tout
            cost_per_day[t.strftime("%Y-%m-%d")] += cost
            errors += status >= 400
        observed = {
            "requests": len(rows),
            "error_rate": round(errors / len(rows), 4) if rows else 0.0,
            "active_minutes": len(per_minute),
            "peak_requests_per_minute": max(per_minute.values(), default=0),
            "p99_requests_per_minute": _p99([float(v) for v in per_minute.values()]),
            "p99_tokens_per_minute": _p99([float(v) for v in tokens_per_minute.values()]),
            "cost_usd": round(sum(cost_per_day.values()), 6),
            "max_daily_cost_usd": round(max(cost_per_day.values(), default=0.0), 6),
        }
        explanation: list[str] = []
        if not rows:
            suggested: dict[str, Any] = {"requests_per_minute": 10, "tokens_per_minute": None,
                                         "cost_per_day_usd": None, "budget_per_month_usd": None}
            explanation.append(f"No usage since {start.isoformat()}: the smallest plan is enough until it is used.")
        else:
            rpm = max(1, math.ceil(observed["p99_requests_per_minute"] * HEADROOM))
            tpm = math.ceil(observed["p99_tokens_per_minute"] * HEADROOM) or None
            daily = observed["max_daily_cost_usd"]
            cost_day = round(daily * HEADROOM, 4) if daily > 0 else None
            suggested = {"requests_per_minute": rpm, "tokens_per_minute": tpm, "cost_per_day_usd": cost_day,
                         "budget_per_month_usd": round(cost_day * 30, 2) if cost_day else None}
            explanation.append(
                f"{observed['requests']} requests over {observed['active_minutes']} active minutes; the busiest "
                f"1% of minutes saw {observed['p99_requests_per_minute']:g} requests (peak "
                f"{observed['peak_requests_per_minute']}): {rpm}/min leaves {int((HEADROOM - 1) * 100)}% headroom.")
            if tpm:
                explanation.append(f"p99 tokens per minute {observed['p99_tokens_per_minute']:g} → {tpm}.")
            if cost_day:
                explanation.append(f"The most expensive day cost ${daily:.4f} → ${cost_day}/day, "
                                   f"${suggested['budget_per_month_usd']}/month.")
        fitting = [p for p in profiles if p.requests_per_minute is not None
                   and p.requests_per_minute >= suggested["requests_per_minute"]]
        best = min(fitting, key=lambda p: p.requests_per_minute or 0, default=None)
        if best is not None:
            explanation.append(f"The tightest existing profile that fits is '{best.name}' "
                               f"({best.requests_per_minute}/min); the key uses '{current}'.")
        return {"key_id": key_id, "window_start": start.isoformat(), "current_profile": current,
                "observed": observed, "suggested_limits": suggested,
                "suggested_profile": best.name if best else None, "explanation": explanation}
