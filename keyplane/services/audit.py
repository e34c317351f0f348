"""Appending to, reading and verifying the per-organization audit chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from keyplane.domain import audit_chain
from keyplane.domain.errors import invalid_request, not_found
from keyplane.logs import redact
from keyplane.services.pagination import decode_cursor, page
from keyplane.services.principal import Principal
from keyplane.store.db import Database
from keyplane.store.models import AuditEvent, Organization


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


async def append(
    session: AsyncSession,
    principal: Principal,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append inside the caller's transaction, so the event and the change commit together.

    The organization row is the chain head; locking it serializes appends across processes
    (SQLite's BEGIN IMMEDIATE already admits one writer). On PostgreSQL the lock is FOR NO KEY
    UPDATE: rows inserted earlier in the transaction hold FOR KEY SHARE on the organization through
    their foreign keys, and a plain FOR UPDATE would deadlock two such writers.
    """
    org = (
        await session.execute(
            select(Organization).where(Organization.id == principal.org_id).with_for_update(key_share=True)
        )
    ).scalar_one()
    details = details or {}
    if principal.via is not None:
        # A change made through an MCP tool is recorded as that tool call; what it did stays in details.
        details = {"change": action, "arguments": redact_arguments(principal.via.arguments), **details}
        action = principal.via.tool
    seq = org.audit_seq + 1
    time = rfc3339(datetime.now(UTC))
    payload = audit_chain.entry_payload(seq, time, principal.label, action, target, details)
    digest = audit_chain.chain_hash(org.audit_head, payload)
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
    )
    session.add(event)
    org.audit_seq = seq
    org.audit_head = digest
    await session.flush()
    return event


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
    }


class AuditService:
    def __init__(self, db: Database) -> None:
        self.db = db

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

    async def verify(self, principal: Principal) -> audit_chain.ChainVerdict:
        principal.require("audit:read")
        return await self.verify_org(principal.org_id)

    async def verify_org(self, org_id: str) -> audit_chain.ChainVerdict:
        async with self.db.read() as s:
            org = (await s.execute(select(Organization).where(Organization.id == org_id))).scalar_one_or_none()
            if org is None:
                raise not_found("organization", org_id)
            result = await s.stream_scalars(
                select(AuditEvent).where(AuditEvent.org_id == org_id).order_by(AuditEvent.seq)
            )
            entries = []
            async for e in result:
                entries.append(
                    audit_chain.ChainEntry(
                        e.seq, e.time, e.principal, e.action, e.target, json.loads(e.details), e.prev_hash, e.hash
                    )
                )
        return audit_chain.verify(entries, head_seq=org.audit_seq, head_hash=org.audit_head)
