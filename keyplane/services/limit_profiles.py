"""Named, reusable limit policies. Seeded per organization: free, standard, professional."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain.errors import conflict, invalid_request
from keyplane.domain.errors import not_found as _not_found
from keyplane.domain.policy import Limits
from keyplane.services import audit
from keyplane.services.invalidation import Invalidator
from keyplane.services.principal import Principal, new_id
from keyplane.services.schemas import LimitProfileCreate, LimitProfileUpdate
from keyplane.store.db import Database
from keyplane.store.models import LimitProfile, VirtualKey

BUILTIN_PROFILES: tuple[dict[str, Any], ...] = (
    {"name": "free", "requests_per_minute": 10, "description": "Trying things out"},
    {"name": "standard", "requests_per_minute": 60, "description": "Everyday use"},
    {"name": "professional", "requests_per_minute": 300, "description": "Heavy use"},
)

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "cost_per_day_usd", "budget_per_month_usd")


def profile_to_dict(p: LimitProfile) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "description": p.description,
        **{f: getattr(p, f) for f in LIMIT_FIELDS},
        "clamp_output": p.clamp_output,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


def limits_of(p: LimitProfile | None) -> Limits:
    if p is None:
        return Limits()
    return Limits(p.requests_per_minute, p.tokens_per_minute, p.cost_per_day_usd, p.budget_per_month_usd,
                  p.clamp_output)


async def by_name(session: AsyncSession, org_id: str, name: str) -> LimitProfile | None:
    q = select(LimitProfile).where(LimitProfile.org_id == org_id, LimitProfile.name == name)
    return (await session.execute(q)).scalar_one_or_none()


async def require_by_name(session: AsyncSession, org_id: str, name: str) -> LimitProfile:
    profile = await by_name(session, org_id, name)
    if profile is None:
        raise invalid_request(f"Unknown limit profile '{name}'", param="limit_profile")
    return profile


async def seed(session: AsyncSession, org_id: str) -> None:
    for spec in BUILTIN_PROFILES:
        session.add(LimitProfile(id=new_id("lp"), org_id=org_id, **spec))


class LimitProfileService:
    def __init__(self, db: Database, invalidator: Invalidator) -> None:
        self.db = db
        self.invalidator = invalidator

    async def list(self, principal: Principal) -> list[dict[str, Any]]:
        principal.require("limit_profiles:list")
        async with self.db.read() as s:
            q = select(LimitProfile).where(LimitProfile.org_id == principal.org_id).order_by(LimitProfile.pk)
            return [profile_to_dict(p) for p in (await s.execute(q)).scalars()]

    async def get(self, principal: Principal, name: str) -> dict[str, Any]:
        principal.require("limit_profiles:list")
        async with self.db.read() as s:
            p = await by_name(s, principal.org_id, name)
            if p is None:
                raise _not_found("limit profile", name)
            return profile_to_dict(p)

    async def create(self, principal: Principal, data: LimitProfileCreate) -> dict[str, Any]:
        principal.require("limit_profiles:write")
        async with self.db.write() as s:
            if await by_name(s, principal.org_id, data.name) is not None:
                raise conflict(f"A limit profile named '{data.name}' already exists")
            p = LimitProfile(id=new_id("lp"), org_id=principal.org_id, **data.model_dump())
            s.add(p)
            await s.flush()
            await audit.append(s, principal, "limit_profile.create", p.id, data.model_dump())
            return profile_to_dict(p)

    async def update(self, principal: Principal, name: str, data: LimitProfileUpdate) -> dict[str, Any]:
        principal.require("limit_profiles:write")
        changes = data.model_dump(exclude_unset=True)
        if changes.get("clamp_output", False) is None:
            del changes["clamp_output"]  # not nullable: null leaves it as it is
        async with self.db.write() as s:
            p = await by_name(s, principal.org_id, name)
            if p is None:
                raise _not_found("limit profile", name)
            for field, value in changes.items():
                setattr(p, field, value)
            p.updated_at = datetime.now(UTC)
            await audit.append(s, principal, "limit_profile.update", p.id, {"name": name, "changes": changes})
            result = profile_to_dict(p)
        self.invalidator.all()  # every key on this profile must see the new limits
        return result

    async def delete(self, principal: Principal, name: str) -> None:
        principal.require("limit_profiles:write")
        async with self.db.write() as s:
            p = await by_name(s, principal.org_id, name)
            if p is None:
                raise _not_found("limit profile", name)
            in_use = (
                await s.execute(
                    select(func.count())
                    .select_from(VirtualKey)
                    .where(VirtualKey.limit_profile_id == p.id, VirtualKey.status != "deleted")
                )
            ).scalar_one()
            if in_use:
                raise conflict(f"Limit profile '{name}' is used by {in_use} key(s); move them first")
            await audit.append(s, principal, "limit_profile.delete", p.id, {"name": name})
            # Deleted keys may still point at it; they are never served again, so let go.
            await s.execute(update(VirtualKey).where(VirtualKey.limit_profile_id == p.id).values(limit_profile_id=None))
            await s.delete(p)
