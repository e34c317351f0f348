"""The dashboard's audit page: the chain's verdict, changes per day, and the events, filtered."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyplane.dashboard import charts
from keyplane.dashboard.forms import _error_text
from keyplane.domain.errors import KeyplaneError

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


class AuditPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/audit", self.audit),
        ]

    async def audit(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        params = request.query_params
        filters = {k: params.get(k) or None for k in ("principal", "action", "target", "since")}
        try:
            page = await self.kp.audit.list(principal, principal_filter=filters["principal"],
                                             action=filters["action"], target=filters["target"],
                                             since=filters["since"], cursor=params.get("cursor") or None, limit=50)
            verdict = await self.kp.audit.verify(principal)
            activity = await self.kp.audit.activity(principal, days=14)
        except KeyplaneError as exc:
            if exc.code == "invalid_request":
                return self.dash._render(request, "audit.html", principal, session, status=400, events=[],
                                    next_cursor=None, filters=filters, verdict=None, error=_error_text(exc))
            return self.dash._forbidden(request, principal, session, exc)
        next_link = None
        if page["next_cursor"]:
            next_link = "?" + urlencode({**{k: v for k, v in filters.items() if v}, "cursor": page["next_cursor"]})
        labels = [d["date"][5:] for d in activity["days"]]  # MM-DD
        activity_chart = charts.bars_over_time(
            "Changes recorded per day, last 14 days (UTC)", labels,
            [charts.Series("changes", [float(d["events"]) for d in activity["days"]], "bar-main")],
            width=charts.HALF_WIDTH)
        actions_chart = charts.horizontal_bars(
            "Most frequent actions, last 14 days", [(a["action"], float(a["events"])) for a in activity["top_actions"]])
        names = await self.kp.principal_names.of(principal, (e["principal"] for e in page["data"]))
        return self.dash._render(request, "audit.html", principal, session, events=page["data"], next_link=next_link,
                            names=names,
                            filters=filters, verdict=verdict, error=None, activity=activity,
                            activity_chart=activity_chart, actions_chart=actions_chart)
