"""Virtual keys: mint, list, edit, disable, enable, rotate, delete, sub-keys. One rule, one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain import mcp_access, policy, tokens
from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError, cannot_grant, conflict, invalid_request, not_found, parent_lacks
from keyplane.services import audit
from keyplane.services.invalidation import Invalidator
from keyplane.services.limit_profiles import limits_of, require_by_name
from keyplane.services.pagination import decode_cursor, page
from keyplane.services.principal import Principal, new_id
from keyplane.services.schemas import KeyCreate, KeyRotate, KeyUpdate
from keyplane.store.db import Database
from keyplane.store.models import LimitProfile, VirtualKey

MAX_SUBKEY_DEPTH = 4


def key_to_dict(k: VirtualKey, profile_name: str | None) -> dict[str, Any]:
    return {
        "id": k.id,
        "name": k.name,
        "masked_key": k.key_mask,
        "status": k.status,
        "scopes": sorted(k.scopes),
        "created_at": k.created_at,
        "created_by": k.created_by,
        "updated_at": k.updated_at,
        "last_used_at": k.last_used_at,
        "expires_at": k.expires_at,
        "ip_allowlist": list(k.ip_allowlist or []),
        "limit_profile": profile_name,
        "cost_center": k.cost_center,
        "environment": k.environment,
        "metadata": dict(k.meta or {}),
        "allowed_models": list(k.allowed_models or []),
        "require_signature": k.require_signature,
        "mcp_servers": k.mcp_servers,
        "parent_id": k.parent_id,
        "request_count": k.request_count,
        "previous_key_valid_until": k.previous_valid_until,
    }


def _check_scopes(principal: Principal, wanted: list[str]) -> None:
    bad = scope_rules.unknown(wanted, scope_rules.DATA_PLANE_SCOPES)
    if bad:
        raise invalid_request(
            f"Unknown data-plane scope(s): {', '.join(bad)}. Known: {', '.join(sorted(scope_rules.DATA_PLANE_SCOPES))}",
            param="scopes",
        )
    lacking = scope_rules.missing(principal.scopes, wanted)
    if lacking:
        raise cannot_grant(lacking)


def require_could_mint(principal: Principal, scopes: list[str],
                       mcp_servers: dict[str, list[str]] | None = None) -> None:
    """The no-escalation rule for every path that hands out a key's secret (create, sub-key, rotate).

    A principal only ever obtains a working secret for a key it could have minted itself: it holds
    ``virtual_keys:create``, every scope the key carries and, when the key reaches any MCP server,
    ``mcp_servers:manage`` (a service account holds no MCP server itself, so only the scope that governs
    the servers may hand out access to them).
    """
    principal.require("virtual_keys:create")
    lacking = scope_rules.missing(principal.scopes, scopes)
    if lacking:
        raise KeyplaneError(
            403, "insufficient_scope",
            f"You cannot obtain a secret for a key with scopes you do not hold: {', '.join(lacking)}",
            extra={"scope": lacking[0]},
        )
    if mcp_servers and not may_grant_mcp_servers(principal):
        raise KeyplaneError(
            403, "insufficient_scope",
            f"You cannot grant or obtain a secret for a key that reaches MCP servers "
            f"({', '.join(sorted(mcp_servers))}) without holding '{MCP_GRANT_SCOPE}'",
            extra={"scope": MCP_GRANT_SCOPE, "param": "mcp_servers"},
        )


MCP_GRANT_SCOPE = "mcp_servers:manage"


def may_grant_mcp_servers(principal: Principal) -> bool:
    return scope_rules.holds(principal.scopes, MCP_GRANT_SCOPE)


def _networks(cidrs: list[str]) -> list[str]:
    try:
        return [str(n) for n in policy.parse_networks(cidrs)]
    except ValueError as exc:
        raise invalid_request(str(exc), param="ip_allowlist") from None


def _metadata(metadata: dict[str, str]) -> dict[str, str]:
    try:
        policy.validate_metadata(metadata)
    except ValueError as exc:
        raise invalid_request(str(exc), param="metadata") from None
    return metadata


def _mcp_servers(grant: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    if grant is None:
        return None
    try:
        return mcp_access.validate(grant)
    except ValueError as exc:
        raise invalid_request(str(exc), param="mcp_servers") from None


def _mcp_narrower(wider: dict[str, list[str]] | None, narrower: dict[str, list[str]], what: str) -> None:
    beyond = mcp_access.covers(wider or {}, narrower)
    if beyond:
        raise invalid_request(f"{what} (beyond it: {', '.join(beyond)})", param="mcp_servers")


def _expiry(data: KeyCreate, now: datetime) -> datetime | None:
    if data.expires_in is not None and data.expires_at is not None:
        raise invalid_request("Give expires_in or expires_at, not both", param="expires_at")
    if data.expires_in is not None:
        return now + timedelta(seconds=data.expires_in)
    if data.expires_at is not None:
        at = data.expires_at if data.expires_at.tzinfo else data.expires_at.replace(tzinfo=UTC)
        if at <= now:
            raise invalid_request("expires_at is in the past", param="expires_at")
        return at.astimezone(UTC)
    return None


class KeyService:
    def __init__(
        self,
        db: Database,
        invalidator: Invalidator,
        *,
        default_limit_profile: str | None,
        recent_use_window: int,
        last_used_in_process: Callable[[str], float | None] = lambda _id: None,
    ) -> None:
        self.db = db
        self.invalidator = invalidator
        self.default_limit_profile = default_limit_profile
        self.recent_use_window = recent_use_window
        self.last_used_in_process = last_used_in_process

    # -- reads ---------------------------------------------------------------------------------

    async def _get_row(self, s: AsyncSession, principal: Principal, key_id: str) -> VirtualKey:
        q = select(VirtualKey).where(
            VirtualKey.id == key_id, VirtualKey.org_id == principal.org_id, VirtualKey.status != "deleted"
        )
        row = (await s.execute(q)).scalar_one_or_none()
        if row is None:
            raise not_found("key", key_id)
        return row

    async def _profile_names(self, s: AsyncSession, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = await s.execute(select(LimitProfile.id, LimitProfile.name).where(LimitProfile.id.in_(ids)))
        return {pid: name for pid, name in rows}

    async def _render(self, s: AsyncSession, row: VirtualKey) -> dict[str, Any]:
        names = await self._profile_names(s, {row.limit_profile_id} if row.limit_profile_id else set())
        return key_to_dict(row, names.get(row.limit_profile_id or ""))

    async def get(self, principal: Principal, key_id: str) -> dict[str, Any]:
        principal.require("virtual_keys:read")
        async with self.db.read() as s:
            return await self._render(s, await self._get_row(s, principal, key_id))

    async def list(
        self,
        principal: Principal,
        *,
        status: str | None = None,
        cost_center: str | None = None,
        environment: str | None = None,
        q: str | None = None,
        parent_id: str | None = None,
        parent_in: Sequence[str] | None = None,
        roots_only: bool = False,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        principal.require("virtual_keys:read")
        query = select(VirtualKey).where(*self._where(principal, status, cost_center, environment, q, parent_id,
                                                      parent_in, roots_only))
        if cursor:
            query = query.where(VirtualKey.pk < decode_cursor(cursor))
        query = query.order_by(VirtualKey.pk.desc()).limit(limit + 1)
        async with self.db.read() as s:
            rows = list((await s.execute(query)).scalars())
            rows, next_cursor = page(rows, limit, lambda k: k.pk)
            names = await self._profile_names(s, {r.limit_profile_id for r in rows if r.limit_profile_id})
        return {"data": [key_to_dict(r, names.get(r.limit_profile_id or "")) for r in rows], "next_cursor": next_cursor}

    async def count(self, principal: Principal, *, status: str | None = None, cost_center: str | None = None,
                    environment: str | None = None, q: str | None = None, roots_only: bool = False) -> int:
        """How many keys ``list`` would page through with the same filters (the dashboard says so)."""
        principal.require("virtual_keys:read")
        query = select(func.count()).select_from(VirtualKey).where(
            *self._where(principal, status, cost_center, environment, q, None, None, roots_only))
        async with self.db.read() as s:
            return int((await s.execute(query)).scalar_one())

    @staticmethod
    def _where(principal: Principal, status: str | None, cost_center: str | None, environment: str | None,
               q: str | None, parent_id: str | None, parent_in: Sequence[str] | None, roots_only: bool) -> list[Any]:
        if status not in (None, "enabled", "disabled"):
            raise invalid_request("status is 'enabled' or 'disabled'", param="status")
        where: list[Any] = [VirtualKey.org_id == principal.org_id, VirtualKey.status != "deleted"]
        if status:
            where.append(VirtualKey.status == status)
        if cost_center:
            where.append(VirtualKey.cost_center == cost_center)
        if environment:
            where.append(VirtualKey.environment == environment)
        if parent_id:
            where.append(VirtualKey.parent_id == parent_id)
        if parent_in is not None:
            where.append(VirtualKey.parent_id.in_(list(parent_in)))
        if roots_only:
            where.append(VirtualKey.parent_id.is_(None))
        if q:
            escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(VirtualKey.name.ilike(f"%{escaped}%", escape="\\"))
        return where

    # -- minting -------------------------------------------------------------------------------

    async def create(self, principal: Principal, data: KeyCreate) -> tuple[dict[str, Any], str]:
        principal.require("virtual_keys:create")
        async with self.db.write() as s:
            return await self._mint(s, principal, data, parent=None)

    async def create_subkey(self, principal: Principal, parent_id: str, data: KeyCreate) -> tuple[dict[str, Any], str]:
        principal.require("virtual_keys:create")
        async with self.db.write() as s:
            parent = await self._get_row(s, principal, parent_id)
            return await self._mint(s, principal, data, parent=parent)

    async def mint(self, s: AsyncSession, principal: Principal, data: KeyCreate) -> tuple[dict[str, Any], str]:
        """A new top-level key inside the caller's transaction (registering an MCP server mints its default key)."""
        principal.require("virtual_keys:create")
        return await self._mint(s, principal, data, parent=None)

    async def _mint(
        self, s: AsyncSession, principal: Principal, data: KeyCreate, parent: VirtualKey | None
    ) -> tuple[dict[str, Any], str]:
        now = datetime.now(UTC)
        if data.scopes is None:
            source = frozenset(parent.scopes) if parent else scope_rules.DEFAULT_KEY_SCOPES
            wanted = sorted(s_ for s_ in source if scope_rules.holds(principal.scopes, s_))
        else:
            wanted = sorted(set(data.scopes))
        _check_scopes(principal, wanted)
        require_could_mint(principal, wanted)
        expires_at = _expiry(data, now)
        networks = _networks(data.ip_allowlist)
        metadata = _metadata(data.metadata)

        profile: LimitProfile | None = None
        profile_name = data.limit_profile
        if profile_name is None and parent is None:
            profile_name = self.default_limit_profile
        if profile_name is not None:
            profile = await require_by_name(s, principal.org_id, profile_name)

        require_signature = data.require_signature
        allowed_models = sorted(set(data.allowed_models))
        mcp_servers = _mcp_servers(data.mcp_servers)
        parent_id = None
        if parent is not None:
            parent_id = parent.id
            depth = await self._depth(s, parent)
            if depth >= MAX_SUBKEY_DEPTH:
                raise invalid_request(f"Sub-keys nest at most {MAX_SUBKEY_DEPTH} deep")
            if parent.status != "enabled":
                raise conflict(f"Parent key '{parent.id}' is {parent.status}", code="parent_disabled")
            beyond = sorted(set(wanted) - set(parent.scopes))
            if beyond:
                raise parent_lacks(parent.id, beyond)
            if parent.expires_at is not None:
                if parent.expires_at <= now:
                    raise conflict(f"Parent key '{parent.id}' has expired", code="parent_expired")
                if expires_at is None:
                    expires_at = parent.expires_at
                elif expires_at > parent.expires_at:
                    raise invalid_request("A sub-key cannot outlive its parent", param="expires_at")
            parent_profile = None
            if parent.limit_profile_id:
                parent_profile = (
                    await s.execute(select(LimitProfile).where(LimitProfile.id == parent.limit_profile_id))
                ).scalar_one_or_none()
            if profile is None:
                profile = parent_profile
            elif parent_profile is not None:
                looser = limits_of(profile).exceeds(limits_of(parent_profile))
                if looser:
                    raise invalid_request(
                        f"A sub-key's limits cannot exceed its parent's: {', '.join(looser)}",
                        param="limit_profile",
                    )
            if parent.allowed_models:
                if not allowed_models:
                    allowed_models = sorted(parent.allowed_models)
                elif not set(allowed_models) <= set(parent.allowed_models):
                    raise invalid_request("A sub-key may only use models its parent may use", param="allowed_models")
            require_signature = require_signature or parent.require_signature
            if mcp_servers is None:
                # Inherited like scopes: only what the principal may grant (as a default, never an error).
                mcp_servers = parent.mcp_servers if may_grant_mcp_servers(principal) else None
            else:
                _mcp_narrower(parent.mcp_servers, mcp_servers, "A sub-key may only use MCP servers and tools its "
                                                              "parent may use")

        require_could_mint(principal, wanted, mcp_servers)
        secret = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
        digest = tokens.hash_token(secret)
        row = VirtualKey(
            id=new_id("key"),
            org_id=principal.org_id,
            parent_id=parent_id,
            name=data.name,
            key_hash=digest,
            key_mask=tokens.mask(secret),
            status="enabled",
            scopes=wanted,
            expires_at=expires_at,
            ip_allowlist=networks,
            limit_profile_id=profile.id if profile else None,
            cost_center=data.cost_center,
            environment=data.environment,
            meta=metadata,
            allowed_models=allowed_models,
            require_signature=require_signature,
            mcp_servers=mcp_servers,
            created_at=now,
            updated_at=now,
            created_by=principal.label,
        )
        s.add(row)
        await s.flush()
        result = key_to_dict(row, profile.name if profile else None)
        await audit.append(
            s,
            principal,
            "virtual_key.create",
            row.id,
            {
                "name": row.name,
                "masked_key": row.key_mask,
                "scopes": wanted,
                "parent_id": parent_id,
                "limit_profile": result["limit_profile"],
                "expires_at": audit.rfc3339(expires_at) if expires_at else None,
                **({"mcp_servers": mcp_servers} if mcp_servers is not None else {}),
            },
        )
        self.invalidator.new_secret(digest)
        return result, secret

    async def _depth(self, s: AsyncSession, key: VirtualKey) -> int:
        depth, current = 1, key.parent_id
        while current is not None and depth <= MAX_SUBKEY_DEPTH:
            current = (await s.execute(select(VirtualKey.parent_id).where(VirtualKey.id == current))).scalar()
            depth += 1
        return depth

    # -- changes -------------------------------------------------------------------------------

    async def update(self, principal: Principal, key_id: str, data: KeyUpdate) -> dict[str, Any]:
        principal.require("virtual_keys:write")
        changes = data.model_dump(exclude_unset=True)
        if not changes:
            raise invalid_request("Nothing to change: give at least one field")
        async with self.db.write() as s:
            row = await self._get_row(s, principal, key_id)
            audited: dict[str, Any] = {}
            if "name" in changes:
                if data.name is None:
                    raise invalid_request("name cannot be null", param="name")
                row.name = data.name
            if "scopes" in changes:
                if data.scopes is None:
                    raise invalid_request("scopes cannot be null", param="scopes")
                new = sorted(set(data.scopes))
                _check_scopes(principal, new)
                wider = sorted(set(new) - set(row.scopes))
                if wider:
                    raise invalid_request(
                        f"Scopes can only be narrowed (not in this key: {', '.join(wider)}); mint a new key instead",
                        param="scopes",
                    )
                row.scopes = new
            if "metadata" in changes:
                row.meta = _metadata(data.metadata or {})
            if "cost_center" in changes:
                row.cost_center = data.cost_center
            if "environment" in changes:
                row.environment = data.environment
            if "ip_allowlist" in changes:
                row.ip_allowlist = _networks(data.ip_allowlist or [])
            if "mcp_servers" in changes:
                new_grant = _mcp_servers(data.mcp_servers) or {}
                _mcp_narrower(row.mcp_servers, new_grant, "MCP permissions can only be narrowed; mint a new key "
                                                          "instead")
                row.mcp_servers = new_grant
            if "limit_profile" in changes:
                row.limit_profile_id = await self._profile_for_update(s, principal, row, data.limit_profile)
            for field in changes:
                audited[field] = changes[field]
            row.updated_at = datetime.now(UTC)
            await audit.append(s, principal, "virtual_key.update", row.id, {"changes": audited})
            result = await self._render(s, row)
        self.invalidator.key(key_id)
        return result

    async def _profile_for_update(
        self, s: AsyncSession, principal: Principal, row: VirtualKey, name: str | None
    ) -> str | None:
        if name is None:
            if row.parent_id:
                raise invalid_request("A sub-key keeps a limit profile no looser than its parent's")
            return None
        profile = await require_by_name(s, principal.org_id, name)
        if row.parent_id:
            parent = (await s.execute(select(VirtualKey).where(VirtualKey.id == row.parent_id))).scalar_one()
            if parent.limit_profile_id:
                parent_profile = (
                    await s.execute(select(LimitProfile).where(LimitProfile.id == parent.limit_profile_id))
                ).scalar_one()
                looser = limits_of(profile).exceeds(limits_of(parent_profile))
                if looser:
                    raise invalid_request(
                        f"A sub-key's limits cannot exceed its parent's: {', '.join(looser)}", param="limit_profile"
                    )
        return profile.id

    async def set_status(self, principal: Principal, key_id: str, enabled: bool) -> dict[str, Any]:
        principal.require("virtual_keys:revoke")
        async with self.db.write() as s:
            row = await self._get_row(s, principal, key_id)
            new_status = "enabled" if enabled else "disabled"
            if row.status != new_status:
                row.status = new_status
                row.updated_at = datetime.now(UTC)
                action = "virtual_key.enable" if enabled else "virtual_key.disable"
                await audit.append(s, principal, action, row.id, {"name": row.name})
            result = await self._render(s, row)
        self.invalidator.key(key_id)
        return result

    async def rotate(self, principal: Principal, key_id: str, data: KeyRotate) -> tuple[dict[str, Any], str]:
        principal.require("virtual_keys:revoke")
        now = datetime.now(UTC)
        async with self.db.write() as s:
            row = await self._get_row(s, principal, key_id)
            require_could_mint(principal, list(row.scopes), row.mcp_servers)
            if row.status != "enabled":  # a new secret for a disabled key would be refused on first use
                raise conflict(f"Key '{row.id}' is {row.status}: a new secret would not work until it is enabled. "
                               f"Enable it first (POST /api/v1/keys/{row.id}/enable, `keyplane keys enable {row.id}`),"
                               " then rotate", code="key_not_enabled")
            old_hash = row.key_hash
            secret = tokens.generate(tokens.VIRTUAL_KEY_PREFIX)
            row.key_hash = tokens.hash_token(secret)
            if data.grace_seconds > 0:
                row.previous_key_hash = old_hash
                row.previous_valid_until = now + timedelta(seconds=data.grace_seconds)
            else:
                row.previous_key_hash = None
                row.previous_valid_until = None
            old_mask, row.key_mask = row.key_mask, tokens.mask(secret)
            row.updated_at = now
            await audit.append(
                s,
                principal,
                "virtual_key.rotate",
                row.id,
                {"old_masked_key": old_mask, "masked_key": row.key_mask, "grace_seconds": data.grace_seconds},
            )
            result = await self._render(s, row)
        self.invalidator.key(key_id)
        self.invalidator.new_secret(row.key_hash)
        return result, secret

    async def delete(self, principal: Principal, key_id: str, *, force: bool = False) -> dict[str, Any]:
        principal.require("virtual_keys:revoke")
        now = datetime.now(UTC)
        async with self.db.write() as s:
            row = await self._get_row(s, principal, key_id)
            last_used = row.last_used_at.timestamp() if row.last_used_at else None
            in_process = self.last_used_in_process(row.id)
            if in_process is not None and (last_used is None or in_process > last_used):
                last_used = in_process
            if not force and last_used is not None and now.timestamp() - last_used < self.recent_use_window:
                used = datetime.fromtimestamp(last_used, UTC)
                raise KeyplaneError(
                    409,
                    "key_recently_used",
                    f"Key '{key_id}' was used at {audit.rfc3339(used)} (within the last "
                    f"{self.recent_use_window // 3600} hours); pass force=true to delete it anyway",
                    extra={"last_used_at": audit.rfc3339(used)},
                )
            # A deleted parent takes its sub-keys (at any depth) with it.
            doomed = [row.id]
            frontier = [row.id]
            while frontier:
                children = (
                    await s.execute(
                        select(VirtualKey.id).where(
                            VirtualKey.parent_id.in_(frontier), VirtualKey.status != "deleted"
                        )
                    )
                ).scalars().all()
                doomed.extend(children)
                frontier = list(children)
            await s.execute(
                update(VirtualKey)
                .where(VirtualKey.id.in_(doomed))
                .values(status="deleted", deleted_at=now, updated_at=now, previous_key_hash=None)
            )
            await audit.append(
                s,
                principal,
                "virtual_key.delete",
                row.id,
                {"name": row.name, "masked_key": row.key_mask, "forced": force, "subkeys_deleted": doomed[1:]},
            )
        for doomed_id in doomed:
            self.invalidator.key(doomed_id)
        return {"id": key_id, "deleted": True, "subkeys_deleted": doomed[1:]}

    # -- bookkeeping from the hot path ---------------------------------------------------------

    async def record_last_used(self, batch: dict[str, tuple[datetime, int]]) -> None:
        async with self.db.write() as s:
            for key_id, (at, count) in batch.items():
                await s.execute(
                    update(VirtualKey)
                    .where(VirtualKey.id == key_id)
                    .where(or_(VirtualKey.last_used_at.is_(None), VirtualKey.last_used_at < at))
                    .values(last_used_at=at)
                )
                await s.execute(
                    update(VirtualKey)
                    .where(VirtualKey.id == key_id)
                    .values(request_count=VirtualKey.request_count + count)
                )
