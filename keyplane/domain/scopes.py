"""Scopes and the one table of which route needs which scope (DESIGN.md "Scopes")."""

from __future__ import annotations

from collections.abc import Iterable

ADMIN = "admin"

CONTROL_PLANE_SCOPES: frozenset[str] = frozenset(
    {
        "virtual_keys:read",
        "virtual_keys:create",
        "virtual_keys:revoke",
        "virtual_keys:write",
        "usage:read",
        "limit_profiles:list",
        "limit_profiles:write",
        "providers:manage",
        "service_accounts:manage",
        "mcp_servers:manage",
        "audit:read",
        "keys:verify",
        ADMIN,
    }
)

DATA_PLANE_SCOPES: frozenset[str] = frozenset(
    {
        "chats:create",
        "completions:create",
        "embeddings:create",
        "models:read",
        "files:read",
        "files:write",
        "contexts:read",
        "contexts:write",
        "messages:create",
        "responses:create",
        "tools:call",
        "prompts:read",
    }
)

ALL_SCOPES = CONTROL_PLANE_SCOPES | DATA_PLANE_SCOPES

# What a new virtual key gets when the request names no scopes (narrowed to what the minter holds).
# Model traffic of every API is in: /v1/messages and /v1/responses spend the same budget under the same
# limits and allowed-models list as chat. Keys are stored with their scopes, so an existing key is never
# widened by this default: it needs messages:create / responses:create added explicitly.
DEFAULT_KEY_SCOPES: frozenset[str] = frozenset(
    {"models:read", "chats:create", "completions:create", "embeddings:create", "messages:create",
     "responses:create"}
)

# Control plane: (method, route template as FastAPI/Starlette declares it) -> required scope.
CONTROL_PLANE_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/keys"): "virtual_keys:read",
    ("POST", "/api/v1/keys"): "virtual_keys:create",
    ("GET", "/api/v1/keys/{key_id}"): "virtual_keys:read",
    ("PATCH", "/api/v1/keys/{key_id}"): "virtual_keys:write",
    ("DELETE", "/api/v1/keys/{key_id}"): "virtual_keys:revoke",
    ("POST", "/api/v1/keys/{key_id}/disable"): "virtual_keys:revoke",
    ("POST", "/api/v1/keys/{key_id}/enable"): "virtual_keys:revoke",
    ("POST", "/api/v1/keys/{key_id}/rotate"): "virtual_keys:revoke",
    ("POST", "/api/v1/keys/{key_id}/subkeys"): "virtual_keys:create",
    ("GET", "/api/v1/keys/{key_id}/recommendation"): "usage:read",
    ("GET", "/api/v1/keys/{key_id}/spend"): "usage:read",
    ("POST", "/api/v1/keys/verify"): "keys:verify",
    ("GET", "/api/v1/service-accounts"): "service_accounts:manage",
    ("POST", "/api/v1/service-accounts"): "service_accounts:manage",
    ("GET", "/api/v1/service-accounts/{sa_id}"): "service_accounts:manage",
    ("DELETE", "/api/v1/service-accounts/{sa_id}"): "service_accounts:manage",
    ("GET", "/api/v1/limit-profiles"): "limit_profiles:list",
    ("GET", "/api/v1/limit-profiles/{name}"): "limit_profiles:list",
    ("POST", "/api/v1/limit-profiles"): "limit_profiles:write",
    ("PATCH", "/api/v1/limit-profiles/{name}"): "limit_profiles:write",
    ("DELETE", "/api/v1/limit-profiles/{name}"): "limit_profiles:write",
    ("GET", "/api/v1/audit"): "audit:read",
    ("GET", "/api/v1/audit/verify"): "audit:read",
    ("GET", "/api/v1/audit/activity"): "audit:read",
    ("GET", "/api/v1/providers"): "providers:manage",
    ("POST", "/api/v1/providers"): "providers:manage",
    ("GET", "/api/v1/providers/{name}"): "providers:manage",
    ("PATCH", "/api/v1/providers/{name}"): "providers:manage",
    ("DELETE", "/api/v1/providers/{name}"): "providers:manage",
    ("GET", "/api/v1/usage/summary"): "usage:read",
    ("GET", "/api/v1/usage/events"): "usage:read",
    ("GET", "/api/v1/alerts"): "usage:read",
    ("POST", "/api/v1/alerts"): "limit_profiles:write",
    ("DELETE", "/api/v1/alerts/{rule_id}"): "limit_profiles:write",
    ("GET", "/api/v1/mcp-servers"): "mcp_servers:manage",
    ("POST", "/api/v1/mcp-servers"): "mcp_servers:manage",
    ("GET", "/api/v1/mcp-servers/{name}"): "mcp_servers:manage",
    ("PATCH", "/api/v1/mcp-servers/{name}"): "mcp_servers:manage",
    ("DELETE", "/api/v1/mcp-servers/{name}"): "mcp_servers:manage",
    ("POST", "/api/v1/mcp-servers/{name}/disable"): "mcp_servers:manage",
    ("POST", "/api/v1/mcp-servers/{name}/enable"): "mcp_servers:manage",
    ("GET", "/api/v1/mcp-servers/{name}/health"): "mcp_servers:manage",
    ("GET", "/api/v1/whoami"): "",  # any valid token
}

# Data plane: (method, path) -> required scope. Exact paths, plus templates whose last segment is one
# ``{parameter}`` (the gateway matches those by prefix and records the template, never the raw path).
DATA_PLANE_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/models"): "models:read",
    ("GET", "/v1/models/{model}"): "models:read",
    ("POST", "/v1/chat/completions"): "chats:create",
    ("POST", "/v1/completions"): "completions:create",
    ("POST", "/v1/embeddings"): "embeddings:create",
    ("POST", "/v1/messages"): "messages:create",
    ("POST", "/v1/messages/count_tokens"): "messages:create",
    ("POST", "/v1/responses"): "responses:create",
    ("GET", "/v1/responses/{response_id}"): "responses:create",  # reading back what the key created
}

# The MCP gateway (/mcp/{name}): JSON-RPC method -> data-plane scope. "" means access to the server is
# enough (the key's mcp_servers names it). Markers, resolved from the request by keyplane.domain.mcp_access:
# TOOL_SCOPE is the called tool's scope from the server's tool_scopes (default tools:call); REF_SCOPE is
# what the completed reference needs (ref/prompt: prompts:read, ref/resource: contexts:read); LISTEN_SCOPE is
# contexts:read when the listener subscribes to resources; TASK_SCOPE is what the tool the task came from
# needs (keyplane.gateway.mcp_tasks: the creating key only, while it may call that tool). A method not in
# this table (and not a notification or a response) is refused: an unknown method is never let through.
TOOL_SCOPE = "{tool}"
REF_SCOPE = "{ref}"
LISTEN_SCOPE = "{listen}"
TASK_SCOPE = "{task}"
DEFAULT_TOOL_SCOPE = "tools:call"
MCP_METHOD_SCOPES: dict[str, str] = {
    "initialize": "",
    "ping": "",
    "tools/list": "",  # answered filtered to the tools the key may call
    "tools/call": TOOL_SCOPE,
    "resources/list": "contexts:read",
    "resources/read": "contexts:read",
    "resources/templates/list": "contexts:read",
    "resources/subscribe": "contexts:read",
    "resources/unsubscribe": "contexts:read",
    "prompts/list": "prompts:read",
    "prompts/get": "prompts:read",
    "completion/complete": REF_SCOPE,
    "logging/setLevel": "",
    "subscriptions/listen": LISTEN_SCOPE,
    "server/discover": "",
    "tasks/get": TASK_SCOPE,  # 2025-11-25 tasks: act on a task this key's tools/call created
    "tasks/result": TASK_SCOPE,
    "tasks/cancel": TASK_SCOPE,
    "tasks/list": "",  # answered filtered to the tasks this key created
}


def holds(held: Iterable[str], scope: str) -> bool:
    """``admin`` holds every scope, control plane and data plane alike."""
    held = held if isinstance(held, (set, frozenset)) else set(held)
    return scope in held or ADMIN in held


def missing(held: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """The scopes of ``wanted`` a holder of ``held`` may not grant (sorted, for stable messages)."""
    held = frozenset(held)
    if ADMIN in held:
        return []
    return sorted(set(wanted) - held)


def unknown(scopes: Iterable[str], allowed: frozenset[str]) -> list[str]:
    return sorted(set(scopes) - allowed)


def expand(held: Iterable[str]) -> frozenset[str]:
    held = frozenset(held)
    return ALL_SCOPES if ADMIN in held else held

# MCP tools (served at /mcp): tool name -> required scope. The guard in front of the SDK reads this table
# for every tools/call; tools/list shows a token only the tools it can call.
MCP_TOOL_SCOPES: dict[str, str] = {
    "keyplane_list_virtual_keys": "virtual_keys:read",
    "keyplane_create_virtual_key": "virtual_keys:create",
    "keyplane_revoke_virtual_key": "virtual_keys:revoke",
    "keyplane_rotate_virtual_key": "virtual_keys:revoke",
    "keyplane_usage_summary": "usage:read",
    "keyplane_list_limit_profiles": "limit_profiles:list",
    "keyplane_recommend_limits": "usage:read",
    "keyplane_key_spend": "usage:read",
    "keyplane_audit_events": "audit:read",
    "keyplane_list_mcp_servers": "mcp_servers:manage",
    "keyplane_register_mcp_server": "mcp_servers:manage",
}
# The tools that change nothing: their calls are audited, but no cache anywhere needs to hear of them.
MCP_READ_ONLY_TOOLS: frozenset[str] = frozenset({
    "keyplane_list_virtual_keys", "keyplane_usage_summary", "keyplane_list_limit_profiles",
    "keyplane_recommend_limits", "keyplane_audit_events", "keyplane_list_mcp_servers", "keyplane_key_spend",
})

# What `keyplane connect --mint` and the dashboard's connect helper give a new agent token by default:
# manage keys and read usage, nothing that touches providers, accounts or the audit trail. The data-plane
# scopes are what keys it mints may carry (a principal never grants what it does not hold).
AGENT_DEFAULT_SCOPES: frozenset[str] = frozenset(
    {"virtual_keys:read", "virtual_keys:create", "virtual_keys:revoke", "usage:read", "limit_profiles:list"}
) | DEFAULT_KEY_SCOPES
