"""Control-plane principals: people at the dashboard, CLIs, agents over MCP."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain import scopes as scope_rules
from keyplane.domain import tokens
from keyplane.domain.errors import KeyplaneError, cannot_grant, invalid_request, not_found
from keyplane.services import audit
from keyplane.services.invalidation import Invalidator
from keyplane.services.principal import Principal, new_id
from keyplane.services.schemas import ServiceAccountCreate
from keyplane.store.db import Database
from keyplane.store.models import ServiceAccount


def sa_to_dict(sa: ServiceAccount) -> dict[str, Any]:
    return {
        "id": sa.id,
        "name": sa.name,
        "description": sa.description,
        "masked_token": sa.token_mask,
        "scopes": sorted(sa.scopes),
        "status": "revoked" if sa.revoked_at else "active",
        "created_at": sa.created_at,
        "created_by": sa.created_by,
        "revoked_at": sa.revoked_at,
    }


async def insert(
    s: AsyncSession, principal: Principal, data: ServiceAccountCreate, token: str | None = None
) -> tuple[ServiceAccount, str]:
    """Create inside the caller's transaction (bootstrap and orgs reuse it)."""
    scopes = sorted(set(data.scopes))
    bad = scope_rules.unknown(scopes, scope_rules.ALL_SCOPES)
    if bad:
        raise invalid_request(f"Unknown scope(s): {', '.join(bad)}", param="scopes")
    lacking = scope_rules.missing(principal.scopes, scopes)
    if lacking:
        raise cannot_grant(lacking)
    token = token or tokens.generate(tokens.SERVICE_ACCOUNT_PREFIX)
    sa = ServiceAccount(
        id=new_id("sa"),
        org_id=principal.org_id,
        name=data.name,
        description=data.description,
        token_hash=tokens.hash_token(token),
        token_mask=tokens.mask(token),
        scopes=scopes,
        created_by=principal.label,
    )
    s.add(sa)
    await s.flush()
    details = {"name": sa.name, "scopes": scopes, "masked_token": sa.token_mask}
    await audit.append(s, principal, "service_account.create", sa.id, details)
    return sa, token


class ServiceAccountService:
    def __init__(self, db: Database, invalidator: Invalidator) -> None:
        self.db = db
        self.invalidator = invalidator

    async def create(self, principal: Principal, data: ServiceAccountCreate) -> tuple[dict[str, Any], str]:
        principal.require("service_accounts:manage")
        async with self.db.write() as s:
            sa, token = await insert(s, principal, data)
            result = sa_to_dict(sa)
        self.invalidator.new_secret(tokens.hash_token(token))
        return result, token

    async def mint_agent_token(self, principal: Principal, client: str) -> tuple[dict[str, Any], str]:
        """A narrowly scoped token for one coding agent (the connect helpers fill it in).

        It gets the agent defaults the minter itself holds: a principal never grants what it lacks.
        """
        scopes = sorted(s for s in scope_rules.AGENT_DEFAULT_SCOPES if scope_rules.holds(principal.scopes, s))
        if not scopes:
            raise cannot_grant(sorted(scope_rules.AGENT_DEFAULT_SCOPES))
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        return await self.create(principal, ServiceAccountCreate(
            name=f"{client} agent {stamp}", scopes=scopes,
            description=f"MCP token for {client}, minted by {principal.label}"))

    async def _get(self, s: AsyncSession, principal: Principal, sa_id: str) -> ServiceAccount:
        sa = (
            await s.execute(
                select(ServiceAccount).where(ServiceAccount.id == sa_id, ServiceAccount.org_id == principal.org_id)
            )
        ).scalar_one_or_none()
        if sa is None:
            raise not_found("service account", sa_id)
        return sa

    async def list(self, principal: Principal, *, include_revoked: bool = False) -> list[dict[str, Any]]:
        principal.require("service_accounts:manage")
        q = select(ServiceAccount).where(ServiceAccount.org_id == principal.org_id)
        if not include_revoked:
            q = q.where(ServiceAccount.revoked_at.is_(None))
        async with self.db.read() as s:
            return [sa_to_dict(sa) for sa in (await s.execute(q.order_by(ServiceAccount.pk))).scalars()]

    async def get(self, principal: Principal, sa_id: str) -> dict[str, Any]:
        principal.require("service_accounts:manage")
        async with self.db.read() as s:
            return sa_to_dict(await self._get(s, principal, sa_id))

    async def revoke(self, principal: Principal, sa_id: str) -> dict[str, Any]:
        principal.require("service_accounts:manage")
        async with self.db.write() as s:
            sa = await self._get(s, principal, sa_id)
            # Revoking an account is power over it: only a holder of all its scopes may do it.
            lacking = scope_rules.missing(principal.scopes, sa.scopes)
            if lacking:
                raise KeyplaneError(
                    403,
                    "insufficient_scope",
                    f"You cannot revoke an account holding scopes you lack: {', '.join(lacking)}",
                    extra={"scope": lacking[0]},
                )
            if sa.revoked_at is None:
                sa.revoked_at = datetime.now(UTC)
                await audit.append(s, principal, "service_account.revoke", sa.id, {"name": sa.name})
            result = sa_to_dict(sa)
        self.invalidator.service_account(sa_id)
        return result
