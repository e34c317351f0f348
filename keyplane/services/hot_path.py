"""What the data plane asks on every request: credentials, routes, spend. A cache hit touches no database."""

from __future__ import annotations

import logging
import time
from hashlib import sha256
from typing import TYPE_CHECKING

from keyplane.domain import tokens
from keyplane.domain.errors import KeyplaneError, invalid_api_key, missing_bearer, too_many_failed_authentications
from keyplane.domain.policy import KeySnapshot
from keyplane.runtime.cache import ABSENT, CredentialCache
from keyplane.runtime.limits import FailureBrake, LimitsUnavailable, limits_unavailable
from keyplane.runtime.miss_batcher import MissBatcher
from keyplane.runtime.spend import Ask, Exhausted, Grant, LocalSpend
from keyplane.runtime.usage_tracker import LastUsedTracker
from keyplane.services import credentials
from keyplane.services.mcp_servers import McpRoute, McpServerService
from keyplane.services.principal import Principal
from keyplane.services.providers import ProviderService, Route
from keyplane.store.db import Database

if TYPE_CHECKING:  # imported when Redis is configured: the CLI and single-process runs skip loading redis
    from keyplane.runtime.shared import (
        SharedSpend,
    )


log = logging.getLogger("keyplane")
_KEY_LENGTH = len(tokens.VIRTUAL_KEY_PREFIX) + tokens.BODY_LEN


def store_unavailable(exc: BaseException) -> KeyplaneError:
    log.error("store unreachable while loading a credential: %s", type(exc).__name__)
    return KeyplaneError(503, "store_unavailable", "The key store cannot be reached right now; retry shortly",
                         headers={"Retry-After": "1"})


class HotPath:
    """The ``Keyplane`` lookups on a request's path (mixed into ``Keyplane``)."""

    db: Database
    key_cache: CredentialCache[KeySnapshot]
    sa_cache: CredentialCache[Principal]
    key_misses: MissBatcher[KeySnapshot]
    tracker: LastUsedTracker
    brake: FailureBrake
    routes: dict[str, dict[str, Route]]
    mcp_routes: dict[tuple[str, str], McpRoute | None]
    providers: ProviderService
    mcp_servers: McpServerService
    spend: LocalSpend | SharedSpend

    # -- authentication (hot path: a cache hit touches no database) -----------------------------

    async def lookup_key(self, token: str) -> KeySnapshot | None:
        if len(token) != _KEY_LENGTH:
            return None
        digest = sha256(token.encode()).hexdigest()  # tokens.hash_token, inline
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
        return await self.key_misses.load(digest)

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

    async def routes_for(self, org_id: str) -> dict[str, Route]:
        """The organization's model -> provider table; loaded once, dropped on any change."""
        table = self.routes.get(org_id)
        if table is None:
            table = await self.providers.routes(org_id)
            self.routes[org_id] = table
        return table

    async def mcp_route_for(self, org_id: str, name: str) -> McpRoute | None:
        """An organization's MCP server by name; loaded once (absence too), dropped on any change."""
        slot = (org_id, name)
        if slot in self.mcp_routes:
            return self.mcp_routes[slot]
        route = await self.mcp_servers.route(org_id, name)
        if len(self.mcp_routes) >= 10_000:  # bounded: names come from requests
            self.mcp_routes.clear()
        self.mcp_routes[slot] = route
        return route

    async def reserve_spend(self, key: KeySnapshot, ask: Ask) -> Grant | Exhausted:
        """Reserve a request's worst case in every token, daily-cost and monthly window of the key and its
        parents, all or nothing (runtime/spend.py)."""
        try:
            # the family: the chain's root key (its last ancestor), without building spend_buckets
            return await self.spend.reserve(key.spend_limits, ask,
                                            key.ancestor_ids[-1] if key.ancestor_ids else key.id)
        except LimitsUnavailable:
            raise limits_unavailable() from None

    async def settle_spend(self, key: KeySnapshot, grant: Grant | None, tokens: int, cost_usd: float) -> None:
        """Count an answer's spend in the key and every ancestor, dropping its reservation if it held one."""
        if grant is not None:
            await self.spend.settle(grant, key.spend_buckets, tokens, cost_usd)
        elif tokens or cost_usd:
            await self.spend.add(key.spend_buckets, tokens, cost_usd)

    def record_use(self, key: KeySnapshot) -> None:
        self.tracker.touch(key.id, time.time())


def _key_tags(snapshot: KeySnapshot) -> tuple[str, ...]:
    return (snapshot.id, *snapshot.ancestor_ids)
