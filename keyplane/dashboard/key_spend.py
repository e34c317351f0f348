"""The key page's "Spend now" panel: each window's limit, settled vs reserved spend, what is left
(services/spend_status.py). Rendered with the page; its Refresh button swaps in a fresh copy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.domain import scopes as scope_rules
from keyplane.services.principal import Principal

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard

TEMPLATE = "key_spend.html"
TITLES = {"tokens_per_minute": "Tokens this minute", "cost_per_day_usd": "Cost today (UTC)",
          "budget_per_month_usd": "Budget this month (UTC)"}


class KeySpendPanel:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [Route("/keys/{key_id}/spend", self.fragment, methods=["GET"])]

    async def panel(self, principal: Principal, key_id: str) -> dict[str, Any] | None:
        """The panel's context, or None for a principal that may not read usage (the panel is not shown)."""
        if not scope_rules.holds(principal.scopes, "usage:read"):
            return None
        status = await self.kp.spend_status.current(principal, key_id)
        return {**status, "titles": TITLES, "limited": any(w["value"] is not None for w in status["windows"])}

    async def fragment(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        key_id = request.path_params["key_id"]
        spend = await self.panel(principal, key_id)  # an unknown key or missing scope: the dashboard's refusal
        if spend is None:
            principal.require("usage:read")
        return self.dash._render(request, TEMPLATE, principal, session, spend=spend, key={"id": key_id})
