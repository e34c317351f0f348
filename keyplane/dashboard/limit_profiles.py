"""The dashboard's limit profiles page: list and create."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.dashboard.forms import _optional_number
from keyplane.services.principal import Principal
from keyplane.services.schemas import LimitProfileCreate

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


class LimitProfilesPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/limit-profiles", self.limit_profiles, methods=["GET", "POST"]),
        ]

    async def limit_profiles(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> dict[str, Any]:
            return await self.kp.limit_profiles.create(principal, LimitProfileCreate(
                name=str(form.get("name") or ""), description=str(form.get("description") or "") or None,
                requests_per_minute=_optional_number(form, "requests_per_minute"),
                tokens_per_minute=_optional_number(form, "tokens_per_minute"),
                cost_per_day_usd=_optional_number(form, "cost_per_day_usd", float),
                budget_per_month_usd=_optional_number(form, "budget_per_month_usd", float)))

        return await self.dash._list_and_create(request, "limit_profiles.html", create, self.kp.limit_profiles.list)
