"""The keyplane MCP tools. Each one is a thin adapter: arguments in, one service call, a dict out.

Scopes are checked twice on purpose: the guard refuses a tools/call over HTTP with a 403 before the
SDK sees it (so clients can show the missing scope), and every service call checks again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ListToolsResult, ToolAnnotations
from pydantic import Field, ValidationError

from keyplane.domain import scopes as scope_rules
from keyplane.domain import secret_scan
from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.guard import principal_of
from keyplane.services.container import Keyplane
from keyplane.services.principal import CallMark, Principal, ToolCall, current_call
from keyplane.services.schemas import KeyCreate, KeyRotate, McpServerCreate
from keyplane.services.traffic import INCLUDE_SUB_KEYS

log = logging.getLogger("keyplane.mcp")

INSTRUCTIONS = (
    "keyplane manages API keys (virtual keys) for LLM APIs and MCP servers. Mint a narrowly scoped key for "
    "what you are building (keyplane_create_virtual_key: the secret is shown once, store it in the app's "
    "secret store, never in code), revoke a leaked one at once (keyplane_revoke_virtual_key), and read usage "
    "to recommend tighter limits (keyplane_usage_summary, keyplane_recommend_limits)."
)

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
DESTROYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False)

Since = Annotated[str, Field(description="Window back from now (30m, 24h, 7d) or an RFC 3339 time")]
KeyId = Annotated[str, Field(description="A virtual key id (key_…), as keyplane_list_virtual_keys shows it")]
IncludeSubKeys = Annotated[bool, Field(description="With a key: count its sub-keys (at any depth) too, as they "
                                                   "count against its limits")]


def _principal(ctx: Context[Any, Any], tool: str | None = None, arguments: dict[str, Any] | None = None) -> Principal:
    principal = principal_of(ctx.request_context.request)
    if principal is None:  # only reachable if the guard were bypassed
        raise ToolError("unauthenticated: no keyplane principal on this request")
    if tool is not None:
        principal = dataclasses.replace(principal, via=ToolCall(tool, arguments or {}))
    return principal


def _fail(exc: KeyplaneError | ValidationError) -> ToolError:
    """A service refusal or bad argument as an MCP tool error: the session carries on."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in exc.errors()
        )
        return ToolError(secret_scan.mask_text(f"invalid_request: {problems}"))
    return ToolError(f"{exc.code}: {exc.message}")


def _shown_once(key: dict[str, Any], secret: str) -> dict[str, Any]:
    return {"key": key, "secret": secret,
            "warning": "This secret is shown once. Store it now; keyplane keeps only its hash."}


class ToolMetrics:
    """Counts every tool call by outcome, for /metrics."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}

    def count(self, tool: str, outcome: str) -> None:
        self.calls[(tool, outcome)] = self.calls.get((tool, outcome), 0) + 1


def _error_text(result: Any) -> str:
    """The message of a failed tool call's result (the model or its wire form)."""
    content = getattr(result, "content", None)
    if content is None and isinstance(result, dict):
        content = result.get("content")
    for item in content or ():
        text = getattr(item, "text", None) if not isinstance(item, dict) else item.get("text")
        if isinstance(text, str):
            return text
    return "the tool call failed"


class ScopedToolList:
    """SDK middleware: tools/list shows a token the tools it may call; counts tools/call outcomes and
    puts every tools/call in the audit log (the ones a change already recorded, once)."""

    def __init__(self, kp: Keyplane, metrics: ToolMetrics) -> None:
        self.kp = kp
        self.metrics = metrics

    def _audit(self, principal: Principal | None, name: Any, known: bool, params: Any, outcome: str,
               reason: str | None = None) -> None:
        if principal is None:  # not through the guard (nothing to attribute it to)
            return
        arguments = params.get("arguments") if isinstance(params, Mapping) else None
        self.kp.tool_calls.record(principal, name if isinstance(name, str) else repr(name), known=known,
                                  arguments=arguments, outcome=outcome, reason=reason)

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "tools/call":
            name = ctx.params.get("name") if ctx.params else None
            known = isinstance(name, str) and name in scope_rules.MCP_TOOL_SCOPES
            tool = name if known else "unknown"
            principal = principal_of(ctx.request)
            mark = CallMark()
            marking = current_call.set(mark)
            try:
                result = await call_next(ctx)
            except Exception as exc:
                self.metrics.count(tool, "error")
                self._audit(principal, name, known, ctx.params, "refused", str(exc) or type(exc).__name__)
                raise
            finally:
                current_call.reset(marking)
            failed = getattr(result, "is_error", False) or (isinstance(result, dict) and result.get("isError"))
            self.metrics.count(tool, "error" if failed else "ok")
            if failed:
                self._audit(principal, name, known, ctx.params, "refused", _error_text(result))
            elif not mark.recorded:  # a read, or a change that changed nothing: its service wrote no event
                self._audit(principal, name, known, ctx.params, "ok")
            return result
        result = await call_next(ctx)
        if ctx.method == "tools/list" and not self.kp.settings.mcp_list_all_tools:
            principal = principal_of(ctx.request)
            held = principal.scopes if principal is not None else frozenset()

            def callable_tool(name: str) -> bool:
                return scope_rules.holds(held, scope_rules.MCP_TOOL_SCOPES.get(name, scope_rules.ADMIN))

            # The handler's result may arrive as the model or already serialized, by SDK path.
            if isinstance(result, ListToolsResult):
                result.tools = [t for t in result.tools if callable_tool(t.name)]
            elif isinstance(result, dict) and isinstance(result.get("tools"), list):
                result = {**result, "tools": [t for t in result["tools"] if callable_tool(t.get("name", ""))]}
        return result


def build_mcp_server(kp: Keyplane, metrics: ToolMetrics) -> MCPServer[Any]:
    mcp: MCPServer[Any] = MCPServer(
        name="keyplane", title="keyplane", instructions=INSTRUCTIONS, version="0.1.0",
        middleware=[ScopedToolList(kp, metrics)],
    )

    @mcp.tool(name="keyplane_list_virtual_keys", title="List virtual keys", annotations=READ_ONLY)
    async def list_virtual_keys(
        ctx: Context[Any, Any],
        cost_center: Annotated[str | None, Field(description="Only keys of this cost center")] = None,
        environment: Annotated[str | None, Field(description="Only keys of this environment")] = None,
        status: Annotated[Literal["enabled", "disabled"] | None, Field(description="enabled or disabled")] = None,
        name: Annotated[str | None, Field(description="Only keys whose name contains this")] = None,
        limit: Annotated[int, Field(ge=1, le=200, description="Page size")] = 50,
        cursor: Annotated[str | None, Field(description="next_cursor of the previous page")] = None,
    ) -> dict[str, Any]:
        """List the organization's virtual keys (masked; secrets are never shown again), newest first."""
        try:
            return await kp.keys.list(_principal(ctx), cost_center=cost_center, environment=environment,
                                      status=status, q=name, cursor=cursor, limit=limit)
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_create_virtual_key", title="Create a virtual key", annotations=CREATES)
    async def create_virtual_key(
        ctx: Context[Any, Any],
        name: Annotated[str, Field(description="What the key is for, e.g. 'checkout-service staging'")],
        scopes: Annotated[list[str] | None, Field(
            description="Data-plane scopes (chats:create, embeddings:create, models:read, …); default the "
                        "standard set, narrowed to what this token holds")] = None,
        expires_in: Annotated[int | None, Field(gt=0, description="Seconds until the key expires")] = None,
        ip_allowlist: Annotated[list[str] | None, Field(description="CIDRs the key may be used from")] = None,
        limit_profile: Annotated[str | None, Field(description="free, standard, professional or a custom one")]
        = None,
        cost_center: Annotated[str | None, Field(description="Who pays, for usage reports")] = None,
        environment: Annotated[str | None, Field(description="development, staging, production, …")] = None,
        metadata: Annotated[dict[str, str] | None, Field(description="Free-form labels")] = None,
        allowed_models: Annotated[list[str] | None, Field(description="Only these models (default: any)")] = None,
        parent_id: Annotated[str | None, Field(description="Mint a sub-key under this key (never wider)")] = None,
    ) -> dict[str, Any]:
        """Create a virtual key. The secret is in the answer once and never again: store it in a secret store."""
        arguments = {k: v for k, v in {
            "name": name, "scopes": scopes, "expires_in": expires_in, "ip_allowlist": ip_allowlist,
            "limit_profile": limit_profile, "cost_center": cost_center, "environment": environment,
            "metadata": metadata, "allowed_models": allowed_models, "parent_id": parent_id}.items() if v is not None}
        principal = _principal(ctx, "keyplane_create_virtual_key", arguments)
        fields = {k: v for k, v in arguments.items() if k != "parent_id"}
        try:
            data = KeyCreate.model_validate(fields)
            if parent_id:
                key, secret = await kp.keys.create_subkey(principal, parent_id, data)
            else:
                key, secret = await kp.keys.create(principal, data)
        except (KeyplaneError, ValidationError) as exc:
            raise _fail(exc) from None
        return _shown_once(key, secret)

    @mcp.tool(name="keyplane_revoke_virtual_key", title="Revoke a virtual key", annotations=DESTROYS)
    async def revoke_virtual_key(
        ctx: Context[Any, Any],
        key_id: KeyId,
        mode: Annotated[Literal["disable", "delete"], Field(
            description="disable (reversible; sub-keys stop too) or delete (permanent)")] = "disable",
        force: Annotated[bool, Field(description="Delete even if the key was used in the last 24 hours")] = False,
    ) -> dict[str, Any]:
        """Stop a key working everywhere at once: disable it (reversible) or delete it (permanent)."""
        arguments = {"key_id": key_id, "mode": mode, "force": force}
        principal = _principal(ctx, "keyplane_revoke_virtual_key", arguments)
        try:
            if mode == "delete":
                return await kp.keys.delete(principal, key_id, force=force)
            return await kp.keys.set_status(principal, key_id, enabled=False)
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_rotate_virtual_key", title="Rotate a virtual key", annotations=DESTROYS)
    async def rotate_virtual_key(
        ctx: Context[Any, Any],
        key_id: KeyId,
        grace_seconds: Annotated[int, Field(ge=0, le=30 * 24 * 3600,
                                            description="How long the old secret keeps working")] = 0,
    ) -> dict[str, Any]:
        """Give a key a new secret (shown once); the old one stops now or after the grace period."""
        principal = _principal(ctx, "keyplane_rotate_virtual_key", {"key_id": key_id, "grace_seconds": grace_seconds})
        try:
            key, secret = await kp.keys.rotate(principal, key_id, KeyRotate(grace_seconds=grace_seconds))
        except KeyplaneError as exc:
            raise _fail(exc) from None
        return _shown_once(key, secret)

    @mcp.tool(name="keyplane_usage_summary", title="Usage summary", annotations=READ_ONLY)
    async def usage_summary(
        ctx: Context[Any, Any],
        since: Since = "24h",
        group_by: Annotated[Literal["model", "provider", "cost_center", "environment", "key", "endpoint",
                                    "mcp_server", "tool", "status_class", "hour", "day"],
                            Field(description="How to group requests, tokens and cost")] = "model",
        key_id: Annotated[str | None, Field(description="Only this key's traffic")] = None,
        include_sub_keys: IncludeSubKeys = INCLUDE_SUB_KEYS,
    ) -> dict[str, Any]:
        """Requests (served + refused + failed), tokens, cost and latency over a window, grouped by provider,
        model, cost center, key…"""
        try:
            return await kp.usage.summary(_principal(ctx), since=since, group_by=group_by, key_id=key_id,
                                          include_sub_keys=include_sub_keys)
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_key_spend", title="A key's spend now: settled vs reserved", annotations=READ_ONLY)
    async def key_spend(ctx: Context[Any, Any], key_id: KeyId) -> dict[str, Any]:
        """A key's current spend windows (tokens this minute, cost today, budget this month): the limit, what
        answers have settled, what requests in flight hold reserved, what is left and when each resets. Its
        sub-keys' spend counts in it."""
        try:
            return await kp.spend_status.current(_principal(ctx), key_id)
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_list_limit_profiles", title="List limit profiles", annotations=READ_ONLY)
    async def list_limit_profiles(ctx: Context[Any, Any]) -> dict[str, Any]:
        """The limit profiles keys can use: requests/minute, tokens/minute, cost per day, monthly budget."""
        try:
            return {"data": await kp.limit_profiles.list(_principal(ctx))}
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_recommend_limits", title="Recommend limits for a key", annotations=READ_ONLY)
    async def recommend_limits(ctx: Context[Any, Any], key_id: KeyId, window: Since = "24h",
                               include_sub_keys: IncludeSubKeys = INCLUDE_SUB_KEYS) -> dict[str, Any]:
        """Observed peak use of a key over a window and the tightest limits that would still fit it; refused
        requests are reported by reason, not counted as demand."""
        try:
            return await kp.recommendations.recommend(_principal(ctx), key_id, window, include_sub_keys)
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_audit_events", title="Audit events", annotations=READ_ONLY)
    async def audit_events(
        ctx: Context[Any, Any],
        principal: Annotated[str | None, Field(description="Only events by this principal (sa_… id)")] = None,
        action: Annotated[str | None, Field(description="e.g. virtual_key.create or keyplane_revoke_virtual_key")]
        = None,
        target: Annotated[str | None, Field(description="Only events on this id")] = None,
        since: Annotated[str | None, Field(description="Window back from now (24h, 7d) or an RFC 3339 time")] = None,
        limit: Annotated[int, Field(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Field(description="next_cursor of the previous page")] = None,
    ) -> dict[str, Any]:
        """The tamper-evident record of control-plane changes, newest first."""
        try:
            return await kp.audit.list(_principal(ctx), principal_filter=principal, action=action, target=target,
                                       since=since, cursor=cursor, limit=limit)
        except KeyplaneError as exc:
            raise _fail(exc) from None

    @mcp.tool(name="keyplane_register_mcp_server", title="Register an MCP server behind keys", annotations=CREATES)
    async def register_mcp_server(
        ctx: Context[Any, Any],
        name: Annotated[str, Field(description="Served at /mcp/{name}: lower-case letters, digits, '-', '_'")],
        url: Annotated[str, Field(description="The upstream's Streamable HTTP endpoint, e.g. http://127.0.0.1:9000/mcp")],
        tool_scopes: Annotated[dict[str, str] | None, Field(
            description="tool -> data-plane scope it needs, e.g. {\"write_file\": \"files:write\"}; else tools:call")]
        = None,
        description: Annotated[str | None, Field(description="What the server is for")] = None,
        default_key: Annotated[bool, Field(description="Also mint a key for every tool of it (shown once)")] = True,
    ) -> dict[str, Any]:
        """Put keyplane keys in front of an MCP server. Upstream credentials are never taken here (they would pass
        through the agent's context): a person adds them with `keyplane mcp-servers update --header-env` or the
        dashboard."""
        arguments = {k: v for k, v in {"name": name, "url": url, "tool_scopes": tool_scopes,
                                       "description": description, "default_key": default_key}.items()
                     if v is not None}
        principal = _principal(ctx, "keyplane_register_mcp_server", arguments)
        try:
            data = McpServerCreate.model_validate(arguments)
            server, key, secret = await kp.mcp_servers.create(principal, data)
        except (KeyplaneError, ValidationError) as exc:
            raise _fail(exc) from None
        result: dict[str, Any] = {"mcp_server": server}
        if key is not None and secret is not None:
            result.update(_shown_once(key, secret))
        return result

    @mcp.tool(name="keyplane_list_mcp_servers", title="List protected MCP servers", annotations=READ_ONLY)
    async def list_mcp_servers(
        ctx: Context[Any, Any],
        check_health: Annotated[bool, Field(description="Also ask each upstream now: reachable? which tools?")]
        = False,
    ) -> dict[str, Any]:
        """The upstream MCP servers keyplane serves to key holders at /mcp/{name} (header values never shown)."""
        try:
            principal = _principal(ctx)
            servers = await kp.mcp_servers.list(principal)
            if check_health:
                for server in servers:
                    server["health"] = await kp.mcp_servers.health(principal, server["name"])
            return {"data": servers}
        except KeyplaneError as exc:
            raise _fail(exc) from None

    return mcp
