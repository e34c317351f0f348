"""Starting and stopping keyplane: migrations, first-start bootstrap, background jobs, catching up with changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from keyplane.config import Settings
from keyplane.domain.errors import KeyplaneError
from keyplane.domain.secrets_box import SecretBox
from keyplane.runtime.access_log import AccessLog
from keyplane.runtime.usage_buffer import UsageBuffer
from keyplane.runtime.usage_tracker import LastUsedTracker
from keyplane.services.alerts import AlertService
from keyplane.services.audit_verify import Checkpointer
from keyplane.services.keys import KeyService
from keyplane.services.organizations import DEFAULT_ORG, OrganizationService
from keyplane.services.tool_calls import ToolCallLog
from keyplane.services.usage import UsageService
from keyplane.store import migrate
from keyplane.store.db import Database
from keyplane.store.models import AuditEvent, Organization

if TYPE_CHECKING:  # imported when Redis is configured: the CLI and single-process runs skip loading redis
    from keyplane.runtime.shared import (
        ChangeBus,
        SharedState,
    )
from keyplane.services.cache_invalidator import CacheInvalidator

log = logging.getLogger("keyplane")


@dataclass(frozen=True)
class Bootstrap:
    """What the first start created; ``admin_token`` is shown once, then forgotten."""

    created: bool
    org_id: str
    admin_token: str | None = None


class Lifecycle:
    """The ``Keyplane`` methods that start, run and stop its background work (mixed into ``Keyplane``)."""

    settings: Settings
    db: Database
    organizations: OrganizationService
    invalidator: CacheInvalidator
    tracker: LastUsedTracker
    keys: KeyService
    access_log: AccessLog
    tool_calls: ToolCallLog
    alerts: AlertService
    checkpointer: Checkpointer
    usage: UsageService
    usage_buffer: UsageBuffer
    bus: ChangeBus | None
    shared: SharedState | None
    _usage_flush: asyncio.Lock
    _last_used_flush: asyncio.Lock
    _tasks: list[asyncio.Task[None]]
    _heads: dict[str, int] | None

    secret_box: Callable[[], SecretBox]  # MasterSecrets

    async def migrate(self) -> None:
        await migrate.upgrade(self.db)

    async def bootstrap(self) -> Bootstrap:
        """Create the ``default`` organization and its admin token on first start only."""
        existing = await self.organizations.by_name(DEFAULT_ORG)
        if existing is not None:
            return Bootstrap(created=False, org_id=existing["id"])
        try:
            new = await self.organizations.create(DEFAULT_ORG, admin_token=self.settings.admin_token)
        except KeyplaneError as exc:
            if exc.code == "conflict":  # another process won the race
                return Bootstrap(created=False, org_id=await self.organizations.require_id(DEFAULT_ORG))
            raise
        return Bootstrap(created=True, org_id=new.org["id"], admin_token=new.admin_token)

    async def start(self) -> Bootstrap:
        self.secret_box()  # fail fast on a missing or unreadable master key
        await self.migrate()
        boot = await self.bootstrap()
        await self.usage.warm_spend_seed()
        self._heads = await self._read_heads()
        self._tasks = [
            asyncio.create_task(self._every(self.settings.last_used_flush_seconds, self.flush), name="flush"),
            asyncio.create_task(self._every(self.settings.change_poll_seconds, self.poll_changes), name="poll"),
            asyncio.create_task(self._every(0.25, self._flush_access_log), name="access-log"),
            asyncio.create_task(self._every(1.0, self.flush_usage), name="usage"),
            asyncio.create_task(self._every(0.2, self.tool_calls.flush), name="tool-call-audit"),
            asyncio.create_task(self._every(self.settings.alert_interval_seconds, self.alerts.evaluate),
                                name="alerts"),
            # The first pass right away: after migration 0004 it pins the legacy prefix of every chain.
            asyncio.create_task(self._every(self.settings.audit_checkpoint_seconds, self.checkpointer.run_once,
                                            first_now=True), name="audit-checkpoints"),
            asyncio.create_task(self._every(self.settings.retention_interval_seconds, self.prune_usage),
                                name="retention"),
        ]
        if self.bus is not None:
            self._tasks += [asyncio.create_task(self.bus.run_publisher(), name="publish-changes"),
                            asyncio.create_task(self.bus.run_subscriber(), name="subscribe-changes")]
            with contextlib.suppress(asyncio.TimeoutError):  # unreachable Redis does not stop a start
                await asyncio.wait_for(self.bus.connected.wait(), 2.0)
        return boot

    async def stop(self) -> None:
        if self.bus is not None:
            self.bus.stop()
        for task in self._tasks:
            task.cancel()
        done, pending = await asyncio.wait(self._tasks, timeout=5) if self._tasks else (set(), set())
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning("background task %s ended with %r", task.get_name(), task.exception())
        if pending:
            log.warning("background tasks did not stop in time: %s", ", ".join(t.get_name() for t in pending))
        self._tasks = []
        self.access_log.flush()
        await self.flush()
        await self.flush_usage()
        await self.tool_calls.flush()
        try:
            await self.checkpointer.run_once()  # the head as this process leaves it
        except Exception:
            log.exception("could not write the audit checkpoint on shutdown")
        await self.close()

    async def close(self) -> None:
        """Release connections (the CLI calls this too, after publishing its change notices)."""
        if self.bus is not None:
            await self.bus.flush()
        if self.shared is not None:
            await self.shared.close()
        await self.db.dispose()

    async def _every(self, seconds: float, job: object, *, first_now: bool = False) -> None:
        while True:
            if not first_now:
                await asyncio.sleep(seconds)
            first_now = False
            try:
                await job()  # type: ignore[operator]
            except Exception:
                log.exception("background job failed; will retry")

    async def _flush_access_log(self) -> None:
        self.access_log.flush()

    async def flush(self) -> None:
        """Write last-used times and request counts. Serialized like :meth:`flush_usage`: a caller does not
        return while the periodic flush it raced with is still writing the counts it took."""
        async with self._last_used_flush:
            await self.tracker.flush(self.keys.record_last_used)

    async def _read_heads(self) -> dict[str, int]:
        async with self.db.read() as s:
            return {org: seq for org, seq in await s.execute(select(Organization.id, Organization.audit_seq))}

    async def poll_changes(self) -> None:
        """Catch up with changes other processes made (the CLI, other servers).

        The audit log is the change feed: every control-plane change appends an event naming its
        action and target, so each new event drops exactly what it touched from this process's
        caches. Anything unexpected (a chain that shrank, events missing) drops everything.
        """
        heads = await self._read_heads()
        if self._heads is None:
            self._heads = heads
            return
        moved = [(org, self._heads.get(org, 0), seq) for org, seq in heads.items() if seq != self._heads.get(org, 0)]
        if moved:
            async with self.db.read() as s:
                for org, seen, seq in moved:
                    if seq < seen:
                        self.invalidator.all()
                        continue
                    rows = (await s.execute(select(AuditEvent.action, AuditEvent.target).where(
                        AuditEvent.org_id == org, AuditEvent.seq > seen, AuditEvent.seq <= seq))).all()
                    if len(rows) != seq - seen:
                        self.invalidator.all()
                        continue
                    for action, target in rows:
                        self.invalidator.changed(action, target)
        self._heads = heads

    async def flush_usage(self) -> None:
        """Write the buffered usage events. Serialized, so that a caller (a test, shutdown) does not return
        while the periodic flush it raced with is still writing the events it took."""
        async with self._usage_flush:
            await self.usage_buffer.flush(self.usage.insert)

    async def prune_usage(self) -> None:
        """Raw usage events and rollups past their retention go, in bounded batches (background job)."""
        removed = await self.usage.prune(self.settings.usage_event_retention_days)
        if removed:
            log.info("retention: removed %d usage rows past their retention", removed)

