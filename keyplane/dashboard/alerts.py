"""The dashboard's alerts page: alert rules (webhooks shown by host only), create and delete."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.dashboard.forms import _optional_number
from keyplane.dashboard.mcp_servers import servers_to_watch
from keyplane.domain import scopes as scope_rules
from keyplane.services.alerts import webhook_host
from keyplane.services.principal import Principal
from keyplane.services.schemas import AlertRuleCreate

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


class AlertsPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/alerts", self.alerts, methods=["GET", "POST"]),
            Route("/alerts/{rule_id}/delete", self.alert_delete, methods=["POST"]),
        ]

    async def alerts(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> tuple[dict[str, Any], str]:
            fields: dict[str, Any] = {
                "name": str(form.get("name") or ""), "kind": str(form.get("kind") or ""),
                "key_id": str(form.get("key_id") or "") or None,
                "mcp_server": str(form.get("mcp_server") or "") or None,
                "threshold": _optional_number(form, "threshold", float),
                "webhook_url": str(form.get("webhook_url") or "")}
            for name in ("window_minutes", "min_requests", "cooldown_seconds"):
                value = _optional_number(form, name)
                if value is not None:
                    fields[name] = value
            return await self.kp.alerts.create(principal, AlertRuleCreate.model_validate(fields))

        async def listing(principal: Principal) -> list[dict[str, Any]]:
            rules = await self.kp.alerts.list(principal)
            for rule in rules:  # a webhook URL may carry a token (Slack, Teams): show where it goes, not all of it
                rule["webhook_host"] = webhook_host(rule.pop("webhook_url"))
            return rules

        async def keys_to_watch(principal: Principal) -> dict[str, Any]:
            keys: list[dict[str, Any]] = []
            if scope_rules.holds(principal.scopes, "virtual_keys:read"):
                keys = (await self.kp.keys.list(principal, status="enabled", limit=200))["data"]
            return {"keys": keys, "key_names": {k["id"]: k["name"] for k in keys},
                    **await servers_to_watch(self.kp, principal)}

        return await self.dash._list_and_create(request, "alerts.html", create, listing, keys_to_watch,
                                           interval=int(self.kp.settings.alert_interval_seconds))

    async def alert_delete(self, request: Request) -> Response:
        rule_id = request.path_params["rule_id"]
        return await self.dash._act_then_return(
            request, lambda principal: self.kp.alerts.delete(principal, rule_id), "alerts")
