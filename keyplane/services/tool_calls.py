"""Every MCP ``tools/call`` in the audit log, under the service account that made it.

A call that changes something is recorded by the service it calls, in the change's own transaction
(the action is the tool's name, see ``audit.append``). Every other call, a read, a no-op or a
refusal (with its reason), is recorded here: queued without I/O on the call's path and appended
in batches moments later (one write transaction per batch, flushed at shutdown too), so recording
costs the call nothing measurable. The queue is bounded; what it drops is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keyplane.services import audit
from keyplane.services.principal import Principal
from keyplane.store.db import Database

log = logging.getLogger("keyplane.audit")

# The action of a call to a tool keyplane does not have (the name the caller sent is in the details).
UNKNOWN_TOOL = "mcp.unknown_tool"
MAX_REASON = 500


@dataclass(slots=True)
class _Pending:
    principal: Principal
    action: str
    target: str
    details: dict[str, Any]
    attempts: int = 0


class ToolCallLog:
    def __init__(self, db: Database, max_pending: int = 50_000) -> None:
        self.db = db
        self.max_pending = max_pending
        self._pending: list[_Pending] = []
        self.dropped = 0
        self.written = 0
        self._flushing = asyncio.Lock()

    def record(self, principal: Principal, tool: str, *, known: bool, arguments: dict[str, Any] | None,
               outcome: str, reason: str | None = None) -> None:
        """Queue one call (no I/O). ``outcome`` is ``ok`` or ``refused``; a refusal says why."""
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("MCP tool-call audit queue full: %d calls not recorded so far", self.dropped)
            return
        args = arguments if isinstance(arguments, dict) else {}
        # The entry is appended moments later: it keeps the time of the call itself.
        details: dict[str, Any] = {"outcome": outcome, "called_at": audit.rfc3339(datetime.now(UTC)),
                                   "arguments": audit.redact_arguments(args)}
        if reason is not None:
            details["reason"] = reason[:MAX_REASON]
        if not known:
            details["tool"] = tool[:200]
        target = args.get("key_id")
        target = "".join(c for c in target[:100] if c.isprintable()) if isinstance(target, str) else ""
        self._pending.append(_Pending(principal, tool if known else UNKNOWN_TOOL, target, details))

    async def flush(self) -> None:
        """Append what is queued; returns once everything queued before the call is written (or failed)."""
        async with self._flushing:  # a flush at shutdown (or a test's) waits for the background one in flight
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self._write(batch)
        except Exception:
            # One bad entry must not hold back the rest: write them one by one, retry a failing one a
            # few times (the store may be down), then give it up and say so.
            log.exception("could not record %d MCP tool calls in the audit log; retrying one by one", len(batch))
            retry = []
            for item in batch:
                try:
                    await self._write([item])
                except Exception:
                    item.attempts += 1
                    if item.attempts < 3:
                        retry.append(item)
                    else:
                        self.dropped += 1
                        log.error("gave up recording an MCP call to %s in the audit log", item.action)
            self._pending = retry + self._pending

    async def _write(self, batch: list[_Pending]) -> None:
        async with self.db.write() as s:
            await audit.append_many(s, [(item.principal, item.action, item.target, item.details) for item in batch])
        self.written += len(batch)
