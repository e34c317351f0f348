"""Upstream MCP servers keyplane protects: register, list, get, update, disable, enable, delete, health.

A server is reached over Streamable HTTP (``url``) or is a stdio program keyplane runs (``command``, an argv
list, with ``env`` and ``cwd``): registering a command runs a program on the keyplane host, so it needs
``mcp_servers:manage`` AND an executable the host's operator listed in ``KEYPLANE_MCP_STDIO_COMMANDS``
(empty by default: no stdio servers). A stdio server's ``env`` values are sealed exactly like headers.

The upstream's headers are credentials: sealed with AES-GCM on the way in (the server id as associated
data), opened only into the gateway's in-memory route table, never returned, logged or audited; only
their names are shown. Registering a server mints its default key (every tool of that server) in the same
transaction, audited like any key creation.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError, conflict, invalid_request
from keyplane.domain.errors import not_found as _not_found
from keyplane.domain.secrets_box import SecretBox
from keyplane.services import audit
from keyplane.services.invalidation import Invalidator
from keyplane.services.keys import KeyService
from keyplane.services.principal import Principal, new_id
from keyplane.services.schemas import KeyCreate, McpServerCreate, McpServerUpdate
from keyplane.store.db import Database
from keyplane.store.models import McpServer

MANAGE = "mcp_servers:manage"


def server_to_dict(m: McpServer) -> dict[str, Any]:
    return {
        "id": m.id,
        "name": m.name,
        "description": m.description,
        "transport": m.transport,
        "url": m.url or None,
        "command": list(m.command) if m.command else None,
        "env": sorted(m.env_names or []),  # names only: the values are write-only
        "cwd": m.cwd,
        "headers": sorted(m.header_names or []),  # names only: the values are write-only
        "tool_scopes": dict(m.tool_scopes or {}),
        "timeout_seconds": m.timeout_seconds,
        "status": m.status,
        "path": f"/mcp/{m.name}",
        "created_at": m.created_at,
        "created_by": m.created_by,
        "updated_at": m.updated_at,
    }


@dataclass(frozen=True, slots=True)
class McpRoute:
    """What the gateway needs to forward to one upstream MCP server (its headers opened, in memory only)."""

    server_id: str
    org_id: str
    name: str
    url: str
    headers: tuple[tuple[str, str], ...]
    tool_scopes: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0
    enabled: bool = True
    transport: str = "http"
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None

    def secrets(self) -> list[str]:
        """Header and env values long enough to be worth masking wherever upstream text is shown."""
        return [value for _name, value in (*self.headers, *self.env) if len(value) >= 6]

    def secret_bytes(self) -> tuple[bytes, ...]:
        """``secrets()`` as the bytes an answer would carry, with a credential's token alone as well (an
        upstream may echo ``Bearer abc`` as ``abc``): longest first, so the whole value is masked first."""
        found: set[bytes] = set()
        for value in self.secrets():
            found.add(value.encode("utf-8", "surrogateescape"))
            scheme, _, token = value.partition(" ")
            if token and scheme.isalpha() and len(token) >= 6:
                found.add(token.encode("utf-8", "surrogateescape"))
        return tuple(sorted(found, key=len, reverse=True))


def command_allowed(command: list[str] | tuple[str, ...], allowed: frozenset[str]) -> bool:
    """May this argv run? Its executable, exactly as written, must be listed (or the list must say '*')."""
    return bool(command) and ("*" in allowed or command[0] in allowed)


def _check_command(command: list[str], allowed: frozenset[str]) -> None:
    if not command_allowed(command, allowed):
        listed = ", ".join(sorted(allowed)) or "none"
        raise KeyplaneError(403, "command_not_allowed",
                            f"'{command[0][:200]}' is not an executable this keyplane host lets stdio MCP servers run "
                            f"(KEYPLANE_MCP_STDIO_COMMANDS: {listed})", extra={"param": "command"})


def _check_tool_scopes(tool_scopes: dict[str, str]) -> None:
    bad = scope_rules.unknown(tool_scopes.values(), scope_rules.DATA_PLANE_SCOPES)
    if bad:
        raise invalid_request(f"Unknown data-plane scope(s) in tool_scopes: {', '.join(bad)}", param="tool_scopes")


def default_key_scopes(tool_scopes: dict[str, str]) -> list[str]:
    """Everything the server's tools, resources and prompts can need through the gateway."""
    return sorted({scope_rules.DEFAULT_TOOL_SCOPE, "contexts:read", "prompts:read", *tool_scopes.values()})


class McpServerService:
    def __init__(self, db: Database, invalidator: Invalidator, box: Callable[[], SecretBox], keys: KeyService,
                 probe: Callable[[McpRoute], Awaitable[dict[str, Any]]] | None = None,
                 allowed_commands: frozenset[str] = frozenset()) -> None:
        self.db = db
        self.allowed_commands = allowed_commands
        self.invalidator = invalidator
        self.box = box
        self.keys = keys
        self.probe = probe  # set by the app: talks MCP to the upstream (keyplane.gateway.mcp_upstream)

    async def _get(self, s: AsyncSession, principal: Principal, name: str) -> McpServer:
        q = select(McpServer).where(McpServer.org_id == principal.org_id, McpServer.name == name)
        m = (await s.execute(q)).scalar_one_or_none()
        if m is None:
            raise _not_found("MCP server", name)
        return m

    def _seal_headers(self, m: McpServer, headers: dict[str, Any]) -> None:
        if headers:
            plain = {name: value.get_secret_value() for name, value in headers.items()}
            for name in plain:
                if name.lower() in ("host", "content-length", "transfer-encoding", "connection", "mcp-session-id"):
                    raise invalid_request(f"Header '{name}' is set by the gateway, not by the server's settings",
                                          param="headers")
            m.headers_sealed = self.box().seal(orjson.dumps(plain).decode(), m.id)
            m.header_names = sorted(plain)
        else:
            m.headers_sealed = None
            m.header_names = []

    def _seal_env(self, m: McpServer, env: dict[str, Any]) -> None:
        if env:
            plain = {name: value.get_secret_value() for name, value in env.items()}
            m.env_sealed = self.box().seal(orjson.dumps(plain).decode(), m.id + "/env")
            m.env_names = sorted(plain)
        else:
            m.env_sealed = None
            m.env_names = []

    async def list(self, principal: Principal) -> list[dict[str, Any]]:
        principal.require(MANAGE)
        async with self.db.read() as s:
            q = select(McpServer).where(McpServer.org_id == principal.org_id).order_by(McpServer.pk)
            return [server_to_dict(m) for m in (await s.execute(q)).scalars()]

    async def get(self, principal: Principal, name: str) -> dict[str, Any]:
        principal.require(MANAGE)
        async with self.db.read() as s:
            return server_to_dict(await self._get(s, principal, name))

    async def create(self, principal: Principal, data: McpServerCreate) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                                              str | None]:
        """The server, and its default key and that key's one-time secret (None when not asked for)."""
        principal.require(MANAGE)
        _check_tool_scopes(data.tool_scopes)
        if data.command is not None:
            _check_command(data.command, self.allowed_commands)
        now = datetime.now(UTC)
        async with self.db.write() as s:
            if (await s.execute(select(McpServer.id).where(McpServer.org_id == principal.org_id,
                                                           McpServer.name == data.name))).first():
                raise conflict(f"An MCP server named '{data.name}' already exists")
            m = McpServer(id=new_id("mcp"), org_id=principal.org_id, name=data.name, description=data.description,
                          transport="stdio" if data.command else "http", url=data.url or "",
                          command=list(data.command) if data.command else None, cwd=data.cwd,
                          tool_scopes=dict(data.tool_scopes),
                          timeout_seconds=data.timeout_seconds, status="enabled", created_at=now, updated_at=now,
                          created_by=principal.label)
            self._seal_headers(m, data.headers)
            self._seal_env(m, data.env)
            s.add(m)
            await s.flush()
            await audit.append(s, principal, "mcp_server.create", m.id, {
                "name": m.name, "url": m.url or None, "command": m.command, "env": m.env_names, "cwd": m.cwd,
                "headers": m.header_names, "tool_scopes": m.tool_scopes,
                "default_key": data.default_key,
            })
            result = server_to_dict(m)
            key: dict[str, Any] | None = None
            secret: str | None = None
            if data.default_key:
                key, secret = await self.keys.mint(s, principal, KeyCreate(
                    name=f"{data.name} (default)", scopes=default_key_scopes(data.tool_scopes),
                    mcp_servers={data.name: ["*"]}))
        self.invalidator.all()
        return result, key, secret

    async def update(self, principal: Principal, name: str, data: McpServerUpdate) -> dict[str, Any]:
        principal.require(MANAGE)
        changes = data.model_dump(exclude_unset=True)
        if not changes:
            raise invalid_request("Nothing to change: give at least one field")
        async with self.db.write() as s:
            m = await self._get(s, principal, name)
            audited: dict[str, Any] = {}
            stdio = m.transport == "stdio"
            if data.url is not None:
                if stdio:
                    raise invalid_request("A stdio server has a command, not a url", param="url")
                m.url = audited["url"] = data.url
            if not stdio and any(changes.get(f) is not None for f in ("command", "env", "cwd")):
                raise invalid_request("command, env and cwd are for a stdio server", param="command")
            if stdio and changes.get("headers"):
                raise invalid_request("A stdio server takes env, not headers", param="headers")
            if data.command is not None:
                _check_command(data.command, self.allowed_commands)
                m.command = audited["command"] = list(data.command)
            if "env" in changes:
                self._seal_env(m, data.env or {})
                audited["env"] = {"names": m.env_names, "values": "replaced"}
            if "cwd" in changes:
                m.cwd = audited["cwd"] = data.cwd
            if "headers" in changes:
                self._seal_headers(m, data.headers or {})
                audited["headers"] = {"names": m.header_names, "values": "replaced"}
            if data.tool_scopes is not None:
                _check_tool_scopes(data.tool_scopes)
                m.tool_scopes = audited["tool_scopes"] = dict(data.tool_scopes)
            if "description" in changes:
                m.description = audited["description"] = data.description
            if data.timeout_seconds is not None:
                m.timeout_seconds = audited["timeout_seconds"] = data.timeout_seconds
            m.updated_at = datetime.now(UTC)
            await audit.append(s, principal, "mcp_server.update", m.id, {"name": name, "changes": audited})
            result = server_to_dict(m)
        self.invalidator.all()
        return result

    async def set_status(self, principal: Principal, name: str, enabled: bool) -> dict[str, Any]:
        principal.require(MANAGE)
        async with self.db.write() as s:
            m = await self._get(s, principal, name)
            status = "enabled" if enabled else "disabled"
            if m.status != status:
                m.status = status
                m.updated_at = datetime.now(UTC)
                await audit.append(s, principal, "mcp_server.enable" if enabled else "mcp_server.disable", m.id,
                                   {"name": name})
            result = server_to_dict(m)
        self.invalidator.all()
        return result

    async def delete(self, principal: Principal, name: str) -> dict[str, Any]:
        principal.require(MANAGE)
        async with self.db.write() as s:
            m = await self._get(s, principal, name)
            await audit.append(s, principal, "mcp_server.delete", m.id, {"name": name})
            await s.delete(m)
        self.invalidator.all()
        return {"name": name, "deleted": True}

    async def mint_key(self, principal: Principal, name: str, label: str) -> tuple[dict[str, Any], str]:
        """A new key for every tool of one server (what `keyplane connect --server NAME --mint` hands an agent)."""
        async with self.db.write() as s:
            m = await self._get(s, principal, name)
            return await self.keys.mint(s, principal, KeyCreate(
                name=label[:100], scopes=default_key_scopes(m.tool_scopes or {}), mcp_servers={m.name: ["*"]}))

    async def health(self, principal: Principal, name: str) -> dict[str, Any]:
        """Reachability and tool list, asked of the upstream now (with its headers, as the gateway sends them)."""
        principal.require(MANAGE)
        route = await self.route(principal.org_id, name)
        if route is None:
            raise _not_found("MCP server", name)
        if self.probe is None:
            raise invalid_request("Health checks need the running server")
        started = time.perf_counter()
        report = await self.probe(route)
        report.setdefault("latency_ms", round((time.perf_counter() - started) * 1000, 1))
        return {"name": name, "status": "enabled" if route.enabled else "disabled", **report}

    async def route(self, org_id: str, name: str) -> McpRoute | None:
        """One server's route, headers opened: for the gateway's in-memory table only."""
        box = self.box()

        def load(s: Session) -> McpRoute | None:
            m = s.execute(select(McpServer).where(McpServer.org_id == org_id, McpServer.name == name)).scalar()
            if m is None:
                return None
            headers: dict[str, str] = orjson.loads(box.open(m.headers_sealed, m.id)) if m.headers_sealed else {}
            env: dict[str, str] = orjson.loads(box.open(m.env_sealed, m.id + "/env")) if m.env_sealed else {}
            return McpRoute(m.id, m.org_id, m.name, m.url, tuple(headers.items()), dict(m.tool_scopes or {}),
                            m.timeout_seconds, m.status == "enabled", m.transport, tuple(m.command or ()),
                            tuple(env.items()), m.cwd)

        return await self.db.run_read(load)
