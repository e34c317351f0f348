"""Dropping cached credentials and routes when the service layer (or another process) changes them."""

from __future__ import annotations

from collections.abc import Callable

from keyplane.domain import scopes as scope_rules
from keyplane.domain.policy import KeySnapshot
from keyplane.runtime.cache import CredentialCache
from keyplane.services.mcp_servers import McpRoute
from keyplane.services.principal import Principal
from keyplane.services.providers import Route
from keyplane.services.tool_calls import UNKNOWN_TOOL

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
        mcp_routes: dict[tuple[str, str], McpRoute | None] | None = None,
    ) -> None:
        self.keys = keys
        self.accounts = accounts
        self.routes = routes
        self.mcp_routes = mcp_routes if mcp_routes is not None else {}
        # Distributed mode: every drop is also published, so every other process drops it too.
        self.publish: Callable[[str, str], None] | None = None
        # Told when the MCP route table is dropped (stdio server processes that may now be stale).
        self.on_mcp_routes_dropped: list[Callable[[], None]] = []

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
            self.mcp_routes.clear()
            for listener in self.on_mcp_routes_dropped:
                listener()
        if publish and self.publish is not None:
            self.publish(kind, target)

    def changed(self, action: str, target: str) -> None:
        """Drop what one audited change (``action`` on ``target``) may have made stale."""
        if action in NOTHING_CACHED_YET:
            # Nothing can hold a stale copy of something just made; dropping the target anyway
            # would also throw away the copy stale-if-error needs if the store goes down next.
            return
        if action in scope_rules.MCP_READ_ONLY_TOOLS or action == UNKNOWN_TOOL:
            return  # an MCP call recorded for the trail only: it changed nothing
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

