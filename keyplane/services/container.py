"""One object that owns the store, the hot-path caches and the services every adapter calls.

The wiring: ``Keyplane.__init__`` builds the store, the caches, the limits and every service; what the
object does lives in its mixins, one idea each:

    cache_invalidator.py   CacheInvalidator: what a change drops from this process's caches (and publishes)
    lifecycle.py           Lifecycle: migrate, bootstrap, start/stop, background jobs, polling for changes
    hot_path.py            HotPath: key and service-account lookups, routes, spend reservations
    master_secrets.py      MasterSecrets: the master key and the keys derived from it
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyplane.config import Settings
from keyplane.domain import signing
from keyplane.domain.policy import KeySnapshot
from keyplane.domain.secrets_box import SecretBox
from keyplane.runtime.access_log import AccessLog
from keyplane.runtime.cache import CredentialCache
from keyplane.runtime.client_ip import ClientAddress
from keyplane.runtime.limits import FailureBrake, MemoryRateLimiter, ReplayWindow
from keyplane.runtime.miss_batcher import MissBatcher
from keyplane.runtime.spend import LocalSpend
from keyplane.runtime.usage_buffer import UsageBuffer
from keyplane.runtime.usage_tracker import LastUsedTracker
from keyplane.services import credentials
from keyplane.services.alerts import AlertService
from keyplane.services.audit import AuditService
from keyplane.services.audit_verify import ChainVerifier, Checkpointer
from keyplane.services.keys import KeyService
from keyplane.services.limit_profiles import LimitProfileService
from keyplane.services.mcp_servers import McpRoute, McpServerService
from keyplane.services.organizations import OrganizationService
from keyplane.services.principal import Principal
from keyplane.services.principal_names import PrincipalNames
from keyplane.services.providers import ProviderService, Route
from keyplane.services.recommendations import RecommendationService
from keyplane.services.service_accounts import ServiceAccountService
from keyplane.services.spend_status import SpendStatusService
from keyplane.services.tool_calls import ToolCallLog
from keyplane.services.usage import Retention, UsageService
from keyplane.store.db import Database

if TYPE_CHECKING:  # imported when Redis is configured: the CLI and single-process runs skip loading redis
    from keyplane.runtime.shared import (
        ChangeBus,
        SharedRateLimiter,
        SharedReplayWindow,
        SharedSpend,
        SharedState,
    )
from keyplane.services.cache_invalidator import NOTHING_CACHED_YET, CacheInvalidator
from keyplane.services.hot_path import HotPath, store_unavailable
from keyplane.services.lifecycle import Bootstrap, Lifecycle
from keyplane.services.master_secrets import MasterSecrets

__all__ = ["NOTHING_CACHED_YET", "Bootstrap", "CacheInvalidator", "Keyplane", "store_unavailable"]


class Keyplane(Lifecycle, HotPath, MasterSecrets):
    """One object that owns the store, the hot-path caches and the services every adapter calls."""

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
        # (org id, server name) -> where /mcp/{name} forwards (upstream headers opened, in memory only)
        self.mcp_routes: dict[tuple[str, str], McpRoute | None] = {}
        self.invalidator = CacheInvalidator(self.key_cache, self.sa_cache, self.routes, self.mcp_routes)
        self.tracker = LastUsedTracker()
        # Concurrent misses share one query: as many loaders as the store reads in parallel.
        self.key_misses: MissBatcher[KeySnapshot] = MissBatcher(
            lambda digests: credentials.load_keys(self.db, digests), max_in_flight=4)
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
        self.principal_names = PrincipalNames(self.db)
        self.tool_calls = ToolCallLog(self.db)
        self._master: bytes | None = None
        self._box: SecretBox | None = None
        self._chain_key: bytes | None = None
        self._signing_key: Ed25519PrivateKey | None = None
        self.db.session_info["audit_chain_key"] = self.audit_chain_key
        self.chain_verifier = ChainVerifier(self.db, self.audit_chain_key,
                                            lambda: self.checkpoint_signing_key().public_key())
        self.audit = AuditService(self.db, self.chain_verifier, settings.checkpoint_dir)
        self.checkpointer = Checkpointer(self.db, self.chain_verifier, settings.checkpoint_dir,
                                         self.checkpoint_signing_key, settings.audit_checkpoint_webhook_url)
        self.providers = ProviderService(self.db, self.invalidator, self.secret_box)
        self.mcp_servers = McpServerService(self.db, self.invalidator, self.secret_box, self.keys,
                                           allowed_commands=settings.mcp_stdio_allowed)
        self.usage_buffer = UsageBuffer()
        self._usage_flush = asyncio.Lock()  # one flush at a time: a flush returns once all taken so far is written
        self._last_used_flush = asyncio.Lock()  # likewise for last-used times and request counts
        self.usage = UsageService(
            self.db,
            Retention(settings.rollup_minute_retention_days, settings.rollup_hour_retention_days,
                      settings.rollup_day_retention_days),
            statement_timeout_ms=settings.summary_statement_timeout_ms,
        )
        self._init_limits(settings)
        self.recommendations = RecommendationService(self.db)
        self.spend_status = SpendStatusService(self.db, self.spend)
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
                                           spend_timeout=settings.redis_spend_timeout_seconds,
                                           namespace=settings.redis_namespace,
                                           max_connections=settings.redis_max_connections)
        self.limiter = SharedRateLimiter(shared)
        brake = SharedBrake(shared, settings.brake_max_failures, settings.brake_block_seconds)
        self.brake = brake
        self.replays = SharedReplayWindow(shared, replay_ttl)
        self.spend = SharedSpend(shared, self.usage.spent_so_far, settings.spend_reservation_seconds)
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
