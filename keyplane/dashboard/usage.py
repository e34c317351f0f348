"""The dashboard's usage page: requests, errors, tokens and cost over a window, as charts and tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.dashboard import charts
from keyplane.domain import money
from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard

WINDOWS = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days"}


async def usage_view(kp: Keyplane, principal: Principal, since: str, key_id: str | None = None) -> dict[str, Any]:
    slot = "hour" if since == "24h" else "day"
    summary = await kp.usage.summary(principal, since=since, group_by=slot, key_id=key_id)
    by_slot = {row["group"]: row for row in summary["data"]}
    now = datetime.now(UTC)
    # From the slot the window starts in to the current one, so that the bars add up to the totals.
    step = timedelta(hours=1) if slot == "hour" else timedelta(days=1)
    at_slot = datetime.fromisoformat(summary["since"]).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if slot == "day":
        at_slot = at_slot.replace(hour=0)
    labels = []
    while at_slot <= now:
        labels.append(at_slot.strftime("%Y-%m-%dT%H:00" if slot == "hour" else "%Y-%m-%d"))
        at_slot += step

    def at(label: str, field: str) -> float:
        for group, row in by_slot.items():
            if str(group).startswith(label):
                return float(row[field])
        return 0.0

    short = [label[11:16] if slot == "hour" else label[5:] for label in labels]
    requests_chart = charts.bars_over_time(
        f"Requests and errors per {slot}", short,
        [charts.Series("requests", [at(x, "requests") for x in labels], "bar-main"),
         charts.Series("errors", [at(x, "errors") for x in labels], "bar-error")], width=charts.FULL_WIDTH)
    result: dict[str, Any] = {"since": since, "slot": slot, "requests_chart": requests_chart,
                              "timeline": [(short[i], at(x, "requests"), at(x, "errors"))
                                           for i, x in enumerate(labels)]}
    # provider and endpoint: model traffic of every API (chat, messages, responses) side by side
    groups = ("model", "cost_center", "provider", "endpoint", "key")  # by key: a parent's sub-keys too
    for group in groups:
        rows = (await kp.usage.summary(principal, since=since, group_by=group, key_id=key_id))["data"]
        result[group] = rows
    # The same "requests" as the chart and every table: served + refused + failed.
    totals = {f: sum(r[f] for r in result["model"]) for f in ("requests", "served", "refused", "failed")}
    totals["error_rate"] = (totals["refused"] + totals["failed"]) / totals["requests"] if totals["requests"] else 0
    result["totals"] = totals
    result["tokens_by_model"] = charts.horizontal_bars(
        "Tokens by model", [(r["group"] or "—", r["total_tokens"]) for r in result["model"]])
    result["cost_by_model"] = charts.horizontal_bars(
        "Cost by model (USD)", [(r["group"] or "—", r["cost_usd"]) for r in result["model"]], fmt=money.usd)
    result["cost_by_cost_center"] = charts.horizontal_bars(
        "Cost by cost center (USD)", [(r["group"] or "—", r["cost_usd"]) for r in result["cost_center"]],
        fmt=money.usd)
    result["tokens_by_cost_center"] = charts.horizontal_bars(
        "Tokens by cost center", [(r["group"] or "—", r["total_tokens"]) for r in result["cost_center"]])
    return result


class UsagePage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/usage", self.usage),
        ]

    async def usage(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        since = request.query_params.get("since", "24h")
        since = since if since in WINDOWS else "24h"
        try:
            view = await usage_view(self.kp, principal, since)
        except KeyplaneError as exc:
            return self.dash._forbidden(request, principal, session, exc)
        names = {}
        if scope_rules.holds(principal.scopes, "virtual_keys:read"):
            page = await self.kp.keys.list(principal, limit=200)
            names = {k["id"]: k["name"] for k in page["data"]}
        top = [(names.get(r["group"], r["group"] or "—"), r) for r in view["key"][:10]]
        view["top_keys_chart"] = charts.horizontal_bars("Top keys by requests", [(n, r["requests"]) for n, r in top],
                                                        width=charts.FULL_WIDTH)
        return self.dash._render(request, "usage.html", principal, session, usage=view, top=top, windows=WINDOWS)
