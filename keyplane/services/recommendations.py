"""Limit recommendations from a key's real usage: the busiest minutes and days, with headroom.

Demand is what the key's traffic (``traffic.key_ids``: with its sub-keys by default, since their requests
count against its limits) asked for and keyplane let through: served and failed requests. Refused
requests are reported as a signal (how many, and why), never counted as demand: a key at its limit
would otherwise be told to loosen it by exactly the requests the limit turned away.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyplane.domain.errors import not_found
from keyplane.services import traffic
from keyplane.services.audit import parse_since
from keyplane.services.limit_profiles import LIMIT_FIELDS
from keyplane.services.principal import Principal
from keyplane.store import rollups
from keyplane.store.db import Database
from keyplane.store.models import LimitProfile, VirtualKey

HEADROOM = 1.5


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def fits(profile: LimitProfile, suggested: dict[str, Any]) -> bool:
    """Whether ``profile`` sets every limit that is suggested, at least as high (an unset limit caps nothing)."""
    for field in LIMIT_FIELDS:
        wanted, has = suggested.get(field), getattr(profile, field)
        if wanted is not None and (has is None or has < wanted):
            return False
    return True


def _tightness(profile: LimitProfile) -> tuple[float, ...]:
    return tuple(math.inf if getattr(profile, f) is None else float(getattr(profile, f)) for f in LIMIT_FIELDS)


def _limits_text(limits: dict[str, Any]) -> str:
    units = {"requests_per_minute": "{}/min", "tokens_per_minute": "{} tokens/min",
             "cost_per_day_usd": "${}/day", "budget_per_month_usd": "${}/month"}
    return ", ".join(units[f].format(limits[f]) for f in LIMIT_FIELDS if limits.get(f) is not None) or "no limits"


class RecommendationService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def recommend(self, principal: Principal, key_id: str, window: str = "24h",
                        include_sub_keys: bool = traffic.INCLUDE_SUB_KEYS) -> dict[str, Any]:
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
            current_profile = next((p for p in profiles if p.id == key.limit_profile_id), None)
            current = current_profile.name if current_profile else None
            ids = await traffic.key_ids(s, principal.org_id, key_id, include_sub_keys)
        # Per-minute rollups of the key's traffic (minute resolution is what a per-minute limit needs).
        lo = rollups.floor_to(int(start.timestamp()), rollups.MINUTE)
        hi = rollups.floor_to(int(time.time()), rollups.MINUTE) + rollups.MINUTE

        def read(s: Session) -> tuple[list[tuple[int, int, int, int, float]], dict[str, int]]:
            conn = s.connection()
            return rollups.per_bucket(conn, ids, lo, hi), rollups.refusals(conn, ids, lo, hi)

        minutes, refusals = await self.db.run_read(read)
        refused_by_code: Counter[str] = Counter(refusals)

        per_minute: Counter[int] = Counter()
        tokens_per_minute: Counter[int] = Counter()
        cost_per_day: defaultdict[str, float] = defaultdict(float)
        demand = failed = 0
        for bucket, count, failed_here, tokens, cost in minutes:
            per_minute[bucket] += count
            tokens_per_minute[bucket] += tokens
            cost_per_day[datetime.fromtimestamp(bucket, UTC).strftime("%Y-%m-%d")] += cost
            failed += failed_here
            demand += count
        refused = sum(refused_by_code.values())
        requests = demand + refused
        observed = {
            "requests": requests,
            "served": demand - failed,
            "refused": refused,
            "failed": failed,
            "refused_by_code": dict(sorted(refused_by_code.items())),
            "demand": demand,
            "error_rate": round((refused + failed) / requests, 4) if requests else 0.0,
            "sub_keys": len(ids) - 1,
            "active_minutes": len(per_minute),
            "peak_requests_per_minute": max(per_minute.values(), default=0),
            "p99_requests_per_minute": _p99([float(v) for v in per_minute.values()]),
            "p99_tokens_per_minute": _p99([float(v) for v in tokens_per_minute.values()]),
            "cost_usd": round(sum(cost_per_day.values()), 6),
            "max_daily_cost_usd": round(max(cost_per_day.values(), default=0.0), 6),
        }
        explanation: list[str] = []
        if observed["sub_keys"]:
            explanation.append(f"Includes the requests of {observed['sub_keys']} sub-key(s): they count against "
                               "this key's limits too.")
        if refused:
            reasons = ", ".join(f"{n} {code}" for code, n in observed["refused_by_code"].items())
            explanation.append(f"{refused} of {requests} requests were refused ({reasons}); refusals are not "
                               "demand, so the figures below leave them out.")
            limited = (refused_by_code["rate_limited"] + refused_by_code["tokens_exceeded"]
                       + refused_by_code["budget_exceeded"])
            if limited:
                explanation.append(
                    f"{limited} were turned away by the current limits ('{current}': "
                    f"{_limits_text({f: getattr(current_profile, f, None) for f in LIMIT_FIELDS})}): if those "
                    "requests were wanted, raise the limit that refused them; if not, it is doing its job.")
        if not demand:
            suggested: dict[str, Any] = {"requests_per_minute": 10, "tokens_per_minute": None,
                                         "cost_per_day_usd": None, "budget_per_month_usd": None}
            explanation.append(f"No requests let through since {start.isoformat()}: the smallest plan is enough "
                               "until it is used.")
        else:
            rpm = max(1, math.ceil(observed["p99_requests_per_minute"] * HEADROOM))
            tpm = math.ceil(observed["p99_tokens_per_minute"] * HEADROOM) or None
            daily = observed["max_daily_cost_usd"]
            cost_day = round(daily * HEADROOM, 4) if daily > 0 else None
            explanation.append(
                f"{observed['demand']} requests let through over {observed['active_minutes']} active minutes; the "
                f"busiest 1% of minutes saw {observed['p99_requests_per_minute']:g} requests (peak "
                f"{observed['peak_requests_per_minute']}): {rpm}/min leaves {int((HEADROOM - 1) * 100)}% headroom.")
            current_rpm = current_profile.requests_per_minute if current_profile else None
            if refused_by_code["rate_limited"] and current_rpm is not None and rpm > current_rpm:
                # Demand was cut off at the limit: the data cannot show a need for more than the limit.
                rpm = current_rpm
                explanation.append(f"The busiest minutes were cut off at the current {current_rpm}/min, so the "
                                   f"suggestion stays at {current_rpm}/min.")
            suggested = {"requests_per_minute": rpm, "tokens_per_minute": tpm, "cost_per_day_usd": cost_day,
                         "budget_per_month_usd": round(cost_day * 30, 2) if cost_day else None}
            if tpm:
                explanation.append(f"p99 tokens per minute {observed['p99_tokens_per_minute']:g} → {tpm}.")
            if cost_day:
                explanation.append(f"The most expensive day cost ${daily:.4f} → ${cost_day}/day, "
                                   f"${suggested['budget_per_month_usd']}/month.")
        best = min((p for p in profiles if fits(p, suggested)), key=_tightness, default=None)
        new_profile = None
        if best is not None:
            explanation.append(f"The tightest existing profile that sets every suggested limit is '{best.name}' "
                               f"({_limits_text({f: getattr(best, f) for f in LIMIT_FIELDS})}); the key uses "
                               f"'{current}'.")
        else:
            new_profile = {f: suggested[f] for f in LIMIT_FIELDS}
            explanation.append(f"No existing profile sets every suggested limit ({_limits_text(suggested)}): "
                               "create one with them (new_profile) and move the key to it.")
        return {"key_id": key_id, "include_sub_keys": include_sub_keys, "key_ids": ids,
                "window_start": start.isoformat(), "current_profile": current,
                "observed": observed, "suggested_limits": suggested,
                "suggested_profile": best.name if best else None, "new_profile": new_profile,
                "explanation": explanation}
