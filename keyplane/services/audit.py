"""Appending to, reading and verifying the per-organization audit chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain import audit_chain, secret_scan
from keyplane.domain.errors import invalid_request
from keyplane.logs import redact
from keyplane.services.pagination import decode_cursor, page
from keyplane.services.principal import Principal, current_call
from keyplane.store.db import Database
from keyplane.store.models import AuditEvent, Organization

if TYPE_CHECKING:
    from keyplane.services.audit_verify import ChainVerifier


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_since(value: str) -> datetime:
    """``24h``, ``30m``, ``7d``, ``90s`` back from now, or an RFC 3339 time."""
    value = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid_request(f"'since' must be like 24h, 30m, 7d or an RFC 3339 time, not '{value}'") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


_SECRET_FIELDS = ("secret", "token", "api_key", "password")


def redact_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments as an audit entry may hold them: secret-named fields dropped, token-shaped text masked."""
    clean: dict[str, Any] = {}
    for name, value in arguments.items():
        if any(word in name.lower() for word in _SECRET_FIELDS):
            clean[name] = "[redacted]"
        else:
            clean[name] = json.loads(redact(json.dumps(value, default=str)))
    return clean


def chain_key_of(session: AsyncSession) -> bytes:
    """The chain key for a session of this store (set by ``Keyplane`` from the master key)."""
    source = session.info.get("audit_chain_key")
    if source is None:
        raise RuntimeError("audit entries are keyed with the master key: this store has no chain key set")
    key: bytes = source()
    return key


async def _lock_head(session: AsyncSession, org_id: str) -> Organization:
    """The organization row is the chain head; locking it serializes appends across processes
    (SQLite's BEGIN IMMEDIATE already admits one writer). On PostgreSQL the lock is FOR NO KEY
    UPDATE: rows inserted earlier in the transaction hold FOR KEY SHARE on the organization through
    their foreign keys, and a plain FOR UPDATE would deadlock two such writers."""
    return (
        await session.execute(select(Organization).where(Organization.id == org_id).with_for_update(key_share=True))
    ).scalar_one()


def _link(chain_key: bytes, org: Organization, principal: Principal, action: str, target: str,
          details: dict[str, Any] | None) -> AuditEvent:
    """The next event of ``org``'s chain (its head moves to it)."""
    # Free text is checked at the edge; whatever still holds a secret is masked before it is chained.
    details = secret_scan.mask(details or {})
    target = secret_scan.mask_text(target)
    if principal.via is not None:
        mark = current_call.get()
        if mark is not None:
            mark.recorded = True  # this MCP tool call is recorded by its change
        # A change made through an MCP tool is recorded as that tool call; what it did stays in details.
        details = {"change": action, "arguments": redact_arguments(principal.via.arguments), **details}
        action = principal.via.tool
    seq = org.audit_seq + 1
    time = rfc3339(datetime.now(UTC))
    payload = audit_chain.entry_payload(seq, time, principal.label, action, target, details)
    digest = audit_chain.keyed_chain_hash(chain_key, org.id, org.audit_head, payload)
    event = AuditEvent(
        org_id=org.id,
        seq=seq,
        time=time,
        principal=principal.label,
        action=action,
        target=target,
        details=audit_chain.canonical_json(details),
        prev_hash=org.audit_head,
        hash=digest,
        hash_version=audit_chain.KEYED_HMAC,
    )
    org.audit_seq = seq
    org.audit_head = digest
    return event


async def append(
    session: AsyncSession,
    principal: Principal,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append inside the caller's transaction, so the event and the change commit together."""
    org = await _lock_head(session, principal.org_id)
    event = _link(chain_key_of(session), org, principal, action, target, details)
    session.add(event)
    await session.flush()
    return event


async def append_many(
    session: AsyncSession, entries: list[tuple[Principal, str, str, dict[str, Any] | None]]
) -> None:
    """Append several events (principal, action, target, details) in order: one lock and one flush per
    organization, not per event (the MCP tool-call log writes its batches this way)."""
    heads: dict[str, Organization] = {}
    chain_key = chain_key_of(session)
    for principal, action, target, details in entries:
        org = heads.get(principal.org_id)
        if org is None:
            org = heads[principal.org_id] = await _lock_head(session, principal.org_id)
        session.add(_link(chain_key, org, principal, action, target, details))
    await session.flush()


def event_to_dict(e: AuditEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "time": e.time,
        "principal": e.principal,
        "action": e.action,
        "target": e.target,
        "details": json.loads(e.details),
        "prev_hash": e.prev_hash,
        "hash": e.hash,
        "hash_version": e.hash_version,
    }


class AuditService:
    def __init__(self, db: Database, verifier: ChainVerifier, checkpoint_dir: Path | None) -> None:
        self.db = db
        self.verifier = verifier
        self.checkpoint_dir = checkpoint_dir

    async def list(
        self,
        principal: Principal,
        *,
        principal_filter: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        principal.require("audit:read")
        q = select(AuditEvent).where(AuditEvent.org_id == principal.org_id)
        if principal_filter:
            q = q.where(AuditEvent.principal == principal_filter)
        if action:
            q = q.where(AuditEvent.action == action)
        if target:
            q = q.where(AuditEvent.target == target)
        if since:
            q = q.where(AuditEvent.time >= rfc3339(parse_since(since)))
        if cursor:
            q = q.where(AuditEvent.seq < decode_cursor(cursor))
        q = q.order_by(AuditEvent.seq.desc()).limit(limit + 1)
        async with self.db.read() as s:
            rows = list((await s.execute(q)).scalars())
        rows, next_cursor = page(rows, limit, lambda e: e.seq)
        return {"data": [event_to_dict(r) for r in rows], "next_cursor": next_cursor}

    async def activity(self, principal: Principal, *, days: int = 14, top: int = 8,
                       now: datetime | None = None) -> dict[str, Any]:
        """How many changes were recorded per day (UTC) over the last ``days`` days, and the most
        frequent actions among them: the audit trail as a picture."""
        principal.require("audit:read")
        if not 1 <= days <= 366:
            raise invalid_request("days is between 1 and 366", param="days")
        today = (now or datetime.now(UTC)).astimezone(UTC).date()
        first = today - timedelta(days=days - 1)
        start = rfc3339(datetime(first.year, first.month, first.day, tzinfo=UTC))
        day = func.substr(AuditEvent.time, 1, 10)  # the stored RFC 3339 text starts with YYYY-MM-DD
        mine = (AuditEvent.org_id == principal.org_id, AuditEvent.time >= start)
        async with self.db.read() as s:
            per_day = dict((await s.execute(select(day, func.count()).where(*mine).group_by(day))).all())
            actions = (await s.execute(select(AuditEvent.action, func.count()).where(*mine)
                                       .group_by(AuditEvent.action)
                                       .order_by(func.count().desc(), AuditEvent.action).limit(top))).all()
        dates = [(first + timedelta(days=i)).isoformat() for i in range(days)]
        return {"days": [{"date": d, "events": int(per_day.get(d, 0))} for d in dates],
                "top_actions": [{"action": a, "events": int(n)} for a, n in actions]}

    async def verify(self, principal: Principal, *, full: bool = False,
                     checkpoints: Path | None = None) -> audit_chain.ChainVerdict:
        """Verify the caller's chain from its newest signed checkpoint (``full``: from the first entry,
        holding every checkpoint to it), with the checkpoints in ``checkpoints`` or the configured directory."""
        principal.require("audit:read")
        return await self.verify_org(principal.org_id, full=full, checkpoints=checkpoints)

    async def verify_org(self, org_id: str, *, full: bool = False,
                         checkpoints: Path | None = None) -> audit_chain.ChainVerdict:
        return await self.verifier.verify_org(org_id, checkpoint_dir=checkpoints or self.checkpoint_dir, full=full)
