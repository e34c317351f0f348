"""The dashboard's connect page: the setup that connects a coding agent, with a token minted on request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.dashboard.forms import _error_text
from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.connect import CLIENTS, connect_instructions, mcp_url_for

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


class ConnectPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/connect", self.connect, methods=["GET"]),
            Route("/connect/mint", self.connect_mint, methods=["POST"]),
        ]

    def _guide(self, client: str, token: str | None) -> Any:
        return connect_instructions(client if client in CLIENTS else "claude-code",
                                    mcp_url_for(self.kp.settings.base_url), token,
                                    query_token_enabled=self.kp.settings.mcp_query_token)

    async def connect(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        client = request.query_params.get("client", "claude-code")
        agents = []
        if scope_rules.holds(principal.scopes, "service_accounts:manage"):
            agents = [a for a in await self.kp.service_accounts.list(principal) if "agent" in a["name"]]
        template = "connect.html" if request.headers.get("hx-request") else "connect_page.html"
        return self.dash._render(request, template, principal, session, guide=self._guide(client, None),
                            clients=CLIENTS, client=client, has_agents=bool(agents), minted=None)

    async def connect_mint(self, request: Request) -> Response:
        principal, session, form = await self.dash._change(request)
        client = str(form.get("client") or "claude-code")
        if not self._guide(client, None).ready:  # no live token for a setup that cannot work
            return self.dash._render(request, "connect.html", principal, session, status=409,
                                guide=self._guide(client, None), clients=CLIENTS, client=client, has_agents=True,
                                minted=None)
        try:
            minted, token = await self.kp.service_accounts.mint_agent_token(principal, CLIENTS.get(client, client))
        except KeyplaneError as exc:
            return self.dash._render(request, "connect.html", principal, session, status=exc.status,
                                guide=self._guide(client, None), clients=CLIENTS, client=client, has_agents=True,
                                minted=None, error=_error_text(exc))
        return self.dash._render(request, "connect.html", principal, session, guide=self._guide(client, token),
                            clients=CLIENTS, client=client, has_agents=True, minted=minted)
