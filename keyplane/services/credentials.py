"""Loading what the hot path caches: a key's folded policy, a service account's principal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from keyplane.domain import mcp_access, policy
from keyplane.domain.policy import Limits
from keyplane.services.keys import MAX_SUBKEY_DEPTH, key_to_dict
from keyplane.services.limit_profiles import limits_of
from keyplane.services.principal import Principal
from keyplane.store.db import Database
from keyplane.store.models import LimitProfile, ServiceAccount, VirtualKey

_PUBLIC_FIELDS = (
    "id", "name", "masked_key", "status", "scopes", "expires_at", "limit_profile", "cost_center",
    "environment", "metadata", "allowed_models", "require_signature", "parent_id", "created_at", "mcp_servers",
)


def _ts(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


def _with_profile(*where: Any) -> Select[tuple[VirtualKey, LimitProfile | None]]:
    """A key and its limit profile in one round trip."""
    return (
        select(VirtualKey, LimitProfile)
        .outerjoin(LimitProfile, VirtualKey.limit_profile_id == LimitProfile.id)
        .where(*where)
    )


async def load_key(db: Database, digest: str) -> policy.KeySnapshot | None:
    return (await load_keys(db, [digest])).get(digest)


async def load_keys(db: Database, digests: Sequence[str]) -> dict[str, policy.KeySnapshot | None]:
    """Several cache misses in one round trip (``runtime.miss_batcher``)."""
    return await db.run_read(lambda s: _load_keys(s, digests))


def _load_keys(s: Session, digests: Sequence[str]) -> dict[str, policy.KeySnapshot | None]:
    """Each digest's key (current or in-grace previous secret), folded with its ancestors.

    One query for all the keys and their profiles (two index lookups per digest), one more per
    ancestor (sub-keys only). A current secret wins over another key's previous one.
    """
    wanted = list(dict.fromkeys(digests))
    rows = s.execute(
        _with_profile(
            or_(VirtualKey.key_hash.in_(wanted), VirtualKey.previous_key_hash.in_(wanted)),
            VirtualKey.status != "deleted",
        )
    ).all()
    by_current = {row.key_hash: (row, profile) for row, profile in rows}
    by_previous = {row.previous_key_hash: (row, profile) for row, profile in rows if row.previous_key_hash}
    out: dict[str, policy.KeySnapshot | None] = {}
    for digest in wanted:
        found = by_current.get(digest) or by_previous.get(digest)
        out[digest] = _fold(s, digest, *found) if found is not None else None
    return out


def _fold(s: Session, digest: str, row: VirtualKey, profile: LimitProfile | None) -> policy.KeySnapshot | None:
    valid_until = None
    if row.key_hash != digest:
        valid_until = _ts(row.previous_valid_until)
        if valid_until is None or valid_until <= datetime.now(UTC).timestamp():
            return None
    status = row.status
    expires = _ts(row.expires_at)
    scopes = frozenset(row.scopes)
    grants = [mcp_access.freeze(row.mcp_servers)]
    ancestors: list[str] = []
    buckets: list[tuple[str, int]] = []
    spend: list[tuple[str, Limits]] = []
    if profile is not None and profile.requests_per_minute:
        buckets.append((row.id, profile.requests_per_minute))
    if limits_of(profile).has_spend_limit:
        spend.append((row.id, limits_of(profile)))
    allowlists = [policy.parse_networks(row.ip_allowlist)] if row.ip_allowlist else []
    parent_id = row.parent_id
    while parent_id is not None and len(ancestors) < MAX_SUBKEY_DEPTH:
        ancestors.append(parent_id)
        up = s.execute(_with_profile(VirtualKey.id == parent_id)).first()
        if up is None or up[0].status != "enabled":
            status = "disabled"
            break
        parent, parent_profile = up
        parent_expiry = _ts(parent.expires_at)
        if parent_expiry is not None and (expires is None or parent_expiry < expires):
            expires = parent_expiry
        scopes &= frozenset(parent.scopes)  # a narrowed parent narrows its sub-keys too
        if parent.ip_allowlist:
            allowlists.append(policy.parse_networks(parent.ip_allowlist))
        grants.append(mcp_access.freeze(parent.mcp_servers))
        if parent_profile is not None and parent_profile.requests_per_minute:
            buckets.append((parent.id, parent_profile.requests_per_minute))
        if limits_of(parent_profile).has_spend_limit:
            spend.append((parent.id, limits_of(parent_profile)))
        parent_id = parent.parent_id
    full = key_to_dict(row, profile.name if profile else None)
    # What the verify API answers with: the effective policy, nothing that changes per request.
    public = {name: full[name] for name in _PUBLIC_FIELDS}
    public.update(
        status=status,
        scopes=sorted(scopes),
        expires_at=datetime.fromtimestamp(expires, UTC) if expires is not None else None,
    )
    return policy.KeySnapshot(
        id=row.id,
        org_id=row.org_id,
        name=row.name,
        status=status,
        scopes=scopes,
        expires_at=expires,
        allowlists=tuple(allowlists),
        limits=limits_of(profile),
        limit_profile=profile.name if profile else None,
        ancestor_ids=tuple(ancestors),
        require_signature=row.require_signature,
        allowed_models=tuple(row.allowed_models or ()),
        cost_center=row.cost_center,
        environment=row.environment,
        valid_until=valid_until,
        buckets=tuple(buckets),
        spend_limits=tuple(spend),
        mcp_grants=tuple(grants),
        # orjson hands back an over-allocated buffer (~8 KiB); a copy keeps just the bytes (~350).
        public_json=bytes(memoryview(orjson.dumps(public))),
    )


async def load_service_account(db: Database, digest: str) -> Principal | None:
    return await db.run_read(lambda s: _load_service_account(s, digest))


def _load_service_account(s: Session, digest: str) -> Principal | None:
    query = select(ServiceAccount).where(ServiceAccount.token_hash == digest, ServiceAccount.revoked_at.is_(None))
    sa = s.execute(query).scalar_one_or_none()
    if sa is None:
        return None
    return Principal(org_id=sa.org_id, id=sa.id, name=sa.name, scopes=frozenset(sa.scopes))
