"""One object that owns the store, the hot-path caches and the services every adapter calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from keyplane.config import Settings
from keyplane.domain import signing, tokens
from keyplane.domain.errors import (
    KeyplaneError,
    invalid_api_key,
    missing_bearer,
    too_many_failed_authentications,
)
from keyplane.domain.policy import KeySnapshot
from keyplane.domain.secrets_box import SecretBox
from keyplane.runtime.access_log import AccessLog
from keyplane.runtime.cache import ABSENT, CredentialCache
from keyplane.runtime.client_ip import ClientAddress
from keyplane.runtime.limits import (
    FailureBrake,
    LimitsUnavailable,
    MemoryRateLimiter,
    ReplayWindow,
    limits_unavailable,
)
from keyplane.runtime.spend import Exhausted, LocalSpend
from keyplane.runtime.usage_buffer import UsageBuffer
from keyplane.runtime.usage_tracker import LastUsedTracker
from keyplane.services import credentials
from keyplane.services.alerts import AlertService
from keyplane.services.audit import AuditService
from keyplane.services.keys import KeyService
from keyplane.services.limit_profiles import LimitProfileService
from keyplane.services.organizations import DEFAULT_ORG, OrganizationService
from keyplane.services.principal import Principal
from keyplane.services.providers import ProviderService, Route
from keyplane.services.recommendations import RecommendationService
from keyplane.services.service_accounts import ServiceAccountService
from keyplane.services.usage import UsageService
from keyplane.store import master_key, migrate
from keyplane.store.db import Database
from keyplane.store.models import AuditEvent, Organization

if TYPE_CHECKING:  # imported when Redis is configured: the CLI and single-process runs skip loading redis
    from keyplane.runtime.shared import (
        ChangeBus,
        SharedRateLimiter,
        SharedReplayWindow,
        SharedSpend,
        SharedState,
    )

log = logging.getLogger("keyplane")
_KEY_LENGTH = len(tokens.VIRTUAL_KEY_PREFIX) + tokens.BODY_LEN


@dataclass(frozen=True)
class Bootstrap:
    """What the first start created; ``admin_token`` is shown once, then forgotten."""

    created: bool
    org_id: str
    admin_token: str | None = None


def store_unavailable(exc: BaseException) -> KeyplaneError:
    log.error("store unreachable while loading a credential: %s", type(exc).__name__)
    return KeyplaneError(503, "store_unavailable", "The key store cannot be reached right now; retry shortly",
                         headers={"Retry-After": "1"})


# Audited creations: the poll skips them (a new secret's negative-cache entry is dropped by the
# writer and, across processes, by the change bus's ``new_secret`` message).
NOTHING_CACHED_YET = frozenset({
    "virtual_key.create", "keyplane_create_virtual_key", "service_account.create",
    "limit_profile.create", "organization.create",
})


class CacheInvalidator:
    """Drops cached credentials in this process when the service layer changes them."""

    def __init__(
        self,
        keys: CredentialCache[KeySnapshot],
        accounts: CredentialCache[Principal],
        routes: dict[str, dict[str, Route]],
    ) -> None:
        self.keys = keys
        self.accounts = accounts
        self.routes = routes
        # Distributed mode: every drop is also published, so every other process drops it too.
        self.publish: Callable[[str, str], None] | None = None

    def key(self, key_id: str) -> None:
        self.apply("key", key_id)

    def service_account(self, sa_id: str) -> None:
        self.apply("service_account", sa_id)

    def new_secret(self, digest: str) -> None:
        self.apply("new_secret", digest)

    def all(self) -> None:
        self.apply("all", "")

    def apply(self, kind: str, target: str, *, publish: bool = True) -> None:
        if kind == "key":
            self.keys.invalidate(target)
        elif kind == "service_account":
            self.accounts.invalidate(target)
        elif kind == "new_secret":
            self.keys.forget_negative(target)
            self.accounts.forget_negative(target)
        else:
            self.keys.clear()
            self.accounts.clear()
            self.routes.clear()
        if publish and self.publish is not None:
            self.publish(kind, target)

    def changed(self, action: str, target: str) -> None:
        """Drop what one audited change (``action`` on ``target``) may have made stale."""
        if action in NOTHING_CACHED_YET:
            # Nothing can hold a stale copy of something just made; dropping the target anyway
            # would also throw away the copy stale-if-error needs if the store goes down next.
            return
        kind = action.partition(".")[0]
        if kind.startswith("keyplane_") and kind.endswith("_virtual_key"):
            kind = "virtual_key"  # an MCP tool call on a key (the tool name is the audited action)
        # Found by polling the shared audit log: every process finds it itself, so nothing is published.
        if kind == "virtual_key":
            self.apply("key", target, publish=False)
        elif kind == "service_account":
            self.apply("service_account", target, publish=False)
        elif kind not in ("alert", "alert_rule"):
            self.apply("all", "", publish=False)  # profiles, providers, organizations: rare, felt by many keys


class Keyplane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.is_sqlite:
            # The store and the master key live here: owner only (mode applies when it is created).
            settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = Database(settings.effective_database_url, schema=settings.database_schema)
        self.key_cache: CredentialCache[KeySnapshot] = CredentialCache(
            settings.key_cache_size,
            settings.key_cache_ttl_seconds,
            settings.negative_cache_size,
            settings.negative_cache_ttl_seconds,
        )
        self.sa_cache: CredentialCache[Principal] = CredentialCache(
            10_000, settings.key_cache_ttl_seconds, 10_000, settings.negative_cache_ttl_seconds
        )
        # org id -> model name -> where to forward (provider secrets opened, in memory only)
        self.routes: dict[str, dict[str, Route]] = {}
        self.invalidator = CacheInvalidator(self.key_cache, self.sa_cache, self.routes)
        self.tracker = LastUsedTracker()
        self.access_log = AccessLog()
        # Who is calling: one resolution (socket peer, or X-Forwarded-For behind a trusted proxy) for
        # the data plane's brake and allowlists and the control plane's brake alike.
        self.client_address = ClientAddress(settings.trusted_proxies)
        self.keys = KeyService(
            self.db,
            self.invalidator,
            default_limit_profile=settings.default_limit_profile,
            recent_use_window=settings.recent_use_window_seconds,
            last_used_in_process=self.tracker.last_used,
        )
        self.service_accounts = ServiceAccountService(self.db, self.invalidator)
        self.limit_profiles = LimitProfileService(self.db, self.invalidator)
        self.audit = AuditService(self.db)
        self._box: SecretBox | None = None
        self.providers = ProviderService(self.db, self.invalidator, self.secret_box)
        self.usage_buffer = UsageBuffer()
        self.usage = UsageService(self.db)
        self._init_limits(settings)
        self.recommendations = RecommendationService(self.db)
        self.alerts = AlertService(self.db, self.usage, self.secret_box)
        self.organizations = OrganizationService(self.db)
        self._tasks: list[asyncio.Task[None]] = []
        self._heads: dict[str, int] | None = None  # org id -> audit seq this process has caught up with

    def _init_limits(self, settings: Settings) -> None:
        """Limits, brake, replay window and spend: in this process, or shared through Redis."""
        replay_ttl = 2 * signing.MAX_SKEW_SECONDS + 5
        self.shared: SharedState | None = None
        self.bus: ChangeBus | None = None
        self.limiter: MemoryRateLimiter | SharedRateLimiter
        self.brake: FailureBrake
        self.replays: ReplayWindow | SharedReplayWindow
        self.spend: LocalSpend | SharedSpend
        if not settings.redis_url:
            self.limiter = MemoryRateLimiter()
            self.brake = FailureBrake(settings.brake_max_failures, settings.brake_block_seconds)
            self.replays = ReplayWindow(replay_ttl)
            self.spend = LocalSpend(self.usage.spent_so_far)
            return
        from keyplane.runtime.shared import (
            ChangeBus,
            SharedBrake,
            SharedRateLimiter,
            SharedReplayWindow,
            SharedSpend,
            SharedState,
        )

        shared = self.shared = SharedState(settings.redis_url, fail_mode=settings.redis_fail_mode,
                                           timeout=settings.redis_timeout_seconds,
                                           namespace=settings.redis_namespace,
                                           max_connections=settings.redis_max_connections)
        self.limiter = SharedRateLimiter(shared)
        brake = SharedBrake(shared, settings.brake_max_failures, settings.brake_block_seconds)
        self.brake = brake
        self.replays = SharedReplayWindow(shared, replay_ttl)
        self.spend = SharedSpend(shared, self.usage.spent_so_far)
        self.bus = brake.bus = ChangeBus(shared, self._on_notice)
        self.invalidator.publish = self.bus.publish

    def _on_notice(self, kind: str, target: str) -> None:
        """A change another process published."""
        if kind == "brake":
            ip, _, seconds = target.rpartition("|")
            with contextlib.suppress(ValueError):
                self.brake.block(ip, time.time(), float(seconds))
            return
        self.invalidator.apply(kind, target, publish=False)

    # -- lifecycle -----------------------------------------------------------------------------

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
        self._heads = await self._read_heads()
        self._tasks = [
            asyncio.create_task(self._every(self.settings.last_used_flush_seconds, self.flush), name="flush"),
            asyncio.create_task(self._every(self.settings.change_poll_seconds, self.poll_changes), name="poll"),
            asyncio.create_task(self._every(0.25, self._flush_access_log), name="access-log"),
            asyncio.create_task(self._every(1.0, self.flush_usage), name="usage"),
            asyncio.create_task(self._every(self.settings.alert_interval_seconds, self.alerts.evaluate),
                                name="alerts"),
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
        await self.close()

    async def close(self) -> None:
        """Release connections (the CLI calls this too, after publishing its change notices)."""
        if self.bus is not None:
            await self.bus.flush()
        if self.shared is not None:
            await self.shared.close()
        await self.db.dispose()

    async def _every(self, seconds: float, job: object) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()  # type: ignore[operator]
            except Exception:
                log.exception("background job failed; will retry")

    async def _flush_access_log(self) -> None:
        self.access_log.flush()

    async def flush(self) -> None:
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

    # -- authentication (hot path: a cache hit touches no database) -----------------------------

    async def lookup_key(self, token: str) -> KeySnapshot | None:
        if len(token) != _KEY_LENGTH:
            return None
        digest = tokens.hash_token(token)
        cached = self.key_cache.peek(digest)
        if cached is ABSENT:
            return None
        if cached is not None:
            return cached  # type: ignore[return-value]  # only well-formed keys are ever cached
        if not tokens.is_well_formed(token, tokens.VIRTUAL_KEY_PREFIX):
            return None  # refused on shape and checksum, without a store lookup
        try:
            return await self.key_cache.load(digest, self._load_key, _key_tags)
        except Exception as exc:
            raise store_unavailable(exc) from None

    async def _load_key(self, digest: str) -> KeySnapshot | None:
        return await credentials.load_key(self.db, digest)

    async def authenticate_service_account(self, token: str | None, ip: str | None = None) -> Principal:
        """The principal behind a service-account token. With the caller's ``ip`` (every network
        adapter passes it), bad tokens count towards the same failed-authentication brake as bad
        virtual keys on the data plane, and a braked address is refused before any lookup."""
        if ip is not None:
            blocked = self.brake.blocked_for(ip, time.time())
            if blocked:
                raise too_many_failed_authentications(blocked)
        if not token:
            raise missing_bearer()
        if not tokens.is_well_formed(token, tokens.SERVICE_ACCOUNT_PREFIX):
            self._failed_authentication(ip)
            raise invalid_api_key("The service-account token is malformed, invalid or revoked")
        digest = tokens.hash_token(token)
        cached = self.sa_cache.peek(digest)
        if cached is ABSENT:
            principal = None
        elif cached is not None:
            principal = cached  # type: ignore[assignment]
        else:
            try:
                principal = await self.sa_cache.load(digest, self._load_sa, lambda p: (p.id,))
            except Exception as exc:
                raise store_unavailable(exc) from None
        if principal is None:
            self._failed_authentication(ip)
            raise invalid_api_key("The service-account token is malformed, invalid or revoked")
        return principal

    def _failed_authentication(self, ip: str | None) -> None:
        if ip is not None:
            self.brake.fail(ip, time.time())

    async def _load_sa(self, digest: str) -> Principal | None:
        return await credentials.load_service_account(self.db, digest)

    def secret_box(self) -> SecretBox:
        """The master key, loaded on first use: from KEYPLANE_MASTER_KEY, or a 0600 file under home."""
        if self._box is None:
            if not self.settings.master_key and not self.settings.is_sqlite:
                raise RuntimeError("KEYPLANE_MASTER_KEY must be set with PostgreSQL (the same on every machine)")
            key = master_key.load_or_create(self.settings.master_key, self.settings.home / "master.key")
            self._box = SecretBox(key)
        return self._box

    async def routes_for(self, org_id: str) -> dict[str, Route]:
        """The organization's model -> provider table; loaded once, dropped on any change."""
        table = self.routes.get(org_id)
        if table is None:
            table = await self.providers.routes(org_id)
            self.routes[org_id] = table
        return table

    async def check_spend(self, key: KeySnapshot) -> Exhausted | None:
        """Is a token, daily-cost or monthly budget window of this key or a parent already spent?"""
        if not key.spend_limits:
            return None
        try:
            return await self.spend.check(key.spend_limits)
        except LimitsUnavailable:
            raise limits_unavailable() from None

    async def flush_usage(self) -> None:
        batch = self.usage_buffer.take()
        if not batch:
            return
        try:
            await self.usage.insert(batch)
        except Exception:
            log.exception("could not write %d usage events; will retry", len(batch))
            self.usage_buffer.restore(batch)
            return
        self.usage_buffer.written += len(batch)

    def record_use(self, key: KeySnapshot) -> None:
        self.tracker.touch(key.id, time.time())


def _key_tags(snapshot: KeySnapshot) -> tuple[str, ...]:
    return (snapshot.id, *snapshot.ancestor_ids)
