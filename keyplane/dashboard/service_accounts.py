"""The dashboard's service accounts page: list, create (the token shown once), revoke."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.domain import scopes as scope_rules
from keyplane.services.principal import Principal
from keyplane.services.schemas import ServiceAccountCreate

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


class ServiceAccountsPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/service-accounts", self.service_accounts, methods=["GET", "POST"]),
            Route("/service-accounts/{sa_id}/revoke", self.sa_revoke, methods=["POST"]),
        ]

    async def service_accounts(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> tuple[dict[str, Any], str]:
            return await self.kp.service_accounts.create(principal, ServiceAccountCreate(
                name=str(form.get("name") or ""), scopes=form.getlist("scopes"),
                description=str(form.get("description") or "") or None))

        async def listing(principal: Principal) -> list[dict[str, Any]]:
            return await self.kp.service_accounts.list(principal, include_revoked=True)

        return await self.dash._list_and_create(
            request, "service_accounts.html", create, listing,
            all_scopes=sorted(scope_rules.CONTROL_PLANE_SCOPES - {scope_rules.ADMIN}),
            data_scopes=sorted(scope_rules.DATA_PLANE_SCOPES))

    async def sa_revoke(self, request: Request) -> Response:
        sa_id = request.path_params["sa_id"]
        return await self.dash._act_then_return(
            request, lambda principal: self.kp.service_accounts.revoke(principal, sa_id), "service-accounts")
