"""Tenants. The embedded default has one, ``default``; ``keyplane orgs create`` adds more."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from keyplane.domain import scopes as scope_rules
from keyplane.domain import tokens
from keyplane.domain.errors import conflict, invalid_request, not_found
from keyplane.services import audit, limit_profiles, service_accounts
from keyplane.services.principal import Principal, new_id, system
from keyplane.services.schemas import ServiceAccountCreate
from keyplane.store.db import Database
from keyplane.store.models import Organization

DEFAULT_ORG = "default"
_ORG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")


@dataclass(frozen=True)
class NewOrganization:
    org: dict[str, Any]
    admin: dict[str, Any]
    admin_token: str


def org_to_dict(o: Organization) -> dict[str, Any]:
    return {"id": o.id, "name": o.name, "created_at": o.created_at, "audit_entries": o.audit_seq}


class OrganizationService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def by_name(self, name: str) -> dict[str, Any] | None:
        async with self.db.read() as s:
            org = (await s.execute(select(Organization).where(Organization.name == name))).scalar_one_or_none()
            return org_to_dict(org) if org else None

    async def require_id(self, name: str) -> str:
        org = await self.by_name(name)
        if org is None:
            raise not_found("organization", name)
        return org["id"]

    async def list(self) -> list[dict[str, Any]]:
        async with self.db.read() as s:
            return [org_to_dict(o) for o in (await s.execute(select(Organization).order_by(Organization.pk))).scalars()]

    async def create(self, name: str, *, admin_token: str | None = None, actor: str = "system") -> NewOrganization:
        """An organization, its built-in limit profiles and an ``admin`` service account, in one transaction."""
        if not _ORG_NAME.match(name):
            raise invalid_request("Organization names are lowercase letters, digits, '-' and '_' (1-100)")
        if admin_token is not None and not tokens.is_well_formed(admin_token, tokens.SERVICE_ACCOUNT_PREFIX):
            raise invalid_request(
                "The admin token must be a well-formed mcp_sa_ token: `keyplane token generate` prints one"
            )
        try:
            async with self.db.write() as s:
                if (await s.execute(select(Organization.id).where(Organization.name == name))).first():
                    raise conflict(f"Organization '{name}' already exists")
                org = Organization(id=new_id("org"), name=name)
                s.add(org)
                await s.flush()
                principal = system(org.id)
                if actor != "system":
                    principal = Principal(org.id, actor, actor, principal.scopes)
                await audit.append(s, principal, "organization.create", org.id, {"name": name})
                await limit_profiles.seed(s, org.id)
                sa, token = await service_accounts.insert(
                    s,
                    principal,
                    ServiceAccountCreate(name="admin", scopes=[scope_rules.ADMIN], description="Created with the org"),
                    token=admin_token,
                )
                return NewOrganization(org_to_dict(org), service_accounts.sa_to_dict(sa), token)
        except IntegrityError:
            # Another process created it between our check and our insert.
            raise conflict(f"Organization '{name}' already exists") from None
