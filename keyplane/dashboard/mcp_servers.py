"""The dashboard's MCP servers page: list, register (the default key shown once), health, disable, delete."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.connect import CLIENTS, connect_instructions, mcp_url_for
from keyplane.services.principal import Principal
from keyplane.services.schemas import McpServerCreate

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard

TEMPLATE = "mcp_servers.html"


def _lines(text: Any, separator: str, what: str) -> dict[str, str]:
    """'name<separator>value' per line (headers 'Name: value', tool scopes 'tool scope')."""
    out: dict[str, str] = {}
    for line in str(text or "").splitlines():
        if not line.strip():
            continue
        name, sep, value = line.strip().partition(separator)
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{what}: one per line, '{'Name: value' if separator == ':' else 'tool scope'}' "
                             f"(not '{line.strip()[:40]}…')")
        out[name.strip()] = value.strip()
    return out


class McpServersPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/mcp-servers", self.page, methods=["GET", "POST"]),
            Route("/mcp-servers/{name}/health", self.health, methods=["GET"]),
            Route("/mcp-servers/{name}/disable", self.status, methods=["POST"]),
            Route("/mcp-servers/{name}/enable", self.status, methods=["POST"]),
            Route("/mcp-servers/{name}/delete", self.delete, methods=["POST"]),
            Route("/mcp-servers/{name}/connect", self.connect, methods=["GET", "POST"]),
        ]

    async def page(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
            return await self.kp.mcp_servers.create(principal, McpServerCreate.model_validate({
                "name": str(form.get("name") or ""), "url": str(form.get("url") or ""),
                "description": str(form.get("description") or "") or None,
                "headers": _lines(form.get("headers"), ":", "headers"),
                "tool_scopes": {tool: scope for tool, scope in
                                _lines(str(form.get("tool_scopes") or "").replace("\t", " "), " ",
                                       "tool scopes").items()},
            }))

        return await self.dash._list_and_create(request, TEMPLATE, create, self.kp.mcp_servers.list,
                                                context=self._usage, base_url=self.kp.settings.base_url.rstrip("/"),
                                                health=None)

    async def _usage(self, principal: Principal) -> dict[str, Any]:
        """The last 24 hours by server and by tool, for principals that may read usage."""
        if not scope_rules.holds(principal.scopes, "usage:read"):
            return {"by_server": [], "by_tool": []}
        out = {}
        for group, label in (("mcp_server", "by_server"), ("tool", "by_tool")):
            rows = (await self.kp.usage.summary(principal, since="24h", group_by=group))["data"]
            out[label] = [r for r in rows if r["group"] != "(none)"]
        return out

    async def health(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        name = request.path_params["name"]
        try:
            report = await self.kp.mcp_servers.health(principal, name)
            items = await self.kp.mcp_servers.list(principal)
        except KeyplaneError as exc:
            return self.dash._forbidden(request, principal, session, exc)
        return self.dash._render(request, TEMPLATE, principal, session, items=items, created=None, error=None,
                                 health=report, base_url=self.kp.settings.base_url.rstrip("/"),
                                 **await self._usage(principal))

    async def status(self, request: Request) -> Response:
        name = request.path_params["name"]
        enable = request.url.path.endswith("/enable")
        return await self.dash._act_then_return(
            request, lambda who: self.kp.mcp_servers.set_status(who, name, enabled=enable), "mcp-servers")

    async def connect(self, request: Request) -> Response:
        """A client's setup for /mcp/{name}; POST mints a key for every tool of the server and fills it in."""
        name = request.path_params["name"]
        key: dict[str, Any] | None = None
        token: str | None = None
        if request.method == "POST":
            principal, session, form = await self.dash._change(request)
            client = str(form.get("client") or "claude-code")
        else:
            principal, session = await self.dash._signed_in(request)
            client = request.query_params.get("client", "claude-code")
        client = client if client in CLIENTS else "claude-code"
        try:
            server = await self.kp.mcp_servers.get(principal, name)
            if request.method == "POST":
                key, token = await self.kp.mcp_servers.mint_key(principal, name, f"{CLIENTS[client]} for {name}")
        except KeyplaneError as exc:
            return self.dash._forbidden(request, principal, session, exc)
        guide = connect_instructions(client, mcp_url_for(self.kp.settings.base_url, name), token, server=name)
        return self.dash._render(request, "mcp_server_connect.html", principal, session, server=server,
                                 guide=guide, clients=CLIENTS, client=client, key=key)

    async def delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        return await self.dash._act_then_return(
            request, lambda who: self.kp.mcp_servers.delete(who, name), "mcp-servers")


async def servers_to_watch(kp: Any, principal: Principal) -> dict[str, Any]:
    """The alerts form's MCP server choices: the registered names when the principal may list them (else the
    form takes a typed name, which the alerts service accepts as it does over REST)."""
    names: list[str] | None = None
    if scope_rules.holds(principal.scopes, "mcp_servers:manage"):
        names = [server["name"] for server in await kp.mcp_servers.list(principal)]
    return {"mcp_server_names": names}
