"""The dashboard's keys pages: the list by state, a key's detail and card, and every change to a key."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from keyplane.dashboard import PREFIX
from keyplane.dashboard.forms import _error_text, _lines, _optional_number, _pairs, _status_of
from keyplane.dashboard.session import Session
from keyplane.dashboard.usage import WINDOWS, usage_view
from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.connect import CLIENTS
from keyplane.services.principal import Principal
from keyplane.services.schemas import KeyCreate, KeyRotate, KeyUpdate

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard

KEYS_PER_PAGE = 50  # per section (enabled, disabled); the page says how many there are in all
SUBKEYS_PER_PAGE = 1000


class KeysPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/keys", self.keys, methods=["GET", "POST"]),
            Route("/keys/{key_id}", self.key_detail),
            Route("/keys/{key_id}/card", self.key_card),
            Route("/keys/{key_id}/name", self.key_name, methods=["GET", "POST"]),
            Route("/keys/{key_id}/status", self.key_status, methods=["POST"]),
            Route("/keys/{key_id}/rotate", self.key_rotate, methods=["POST"]),
            Route("/keys/{key_id}/delete", self.key_delete, methods=["POST"]),
            Route("/keys/{key_id}/subkeys", self.key_subkey, methods=["POST"]),
        ]

    async def _keys_page(self, request: Request, principal: Principal, session: Session, status: int = 200,
                         **extra: Any) -> HTMLResponse:
        params = request.query_params
        filters = {k: params.get(k) or None for k in ("cost_center", "environment", "q")}
        filtered = any(filters.values())  # a filter lists matching keys flat, sub-keys included
        sections: dict[str, dict[str, Any]] = {}
        for state in ("enabled", "disabled"):
            after = params.get(f"{state}_after") or None
            listed = await self.kp.keys.list(principal, status=state, roots_only=not filtered, cursor=after,
                                             limit=KEYS_PER_PAGE, **filters)
            shown = {k: v for k, v in filters.items() if v}
            sections[state] = {
                "keys": listed["data"],
                "total": await self.kp.keys.count(principal, status=state, roots_only=not filtered, **filters),
                "next_link": "?" + urlencode({**shown, f"{state}_after": listed["next_cursor"]})
                if listed["next_cursor"] else None,
                "first_link": ("?" + urlencode(shown)) if after else None,
            }
        children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
        frontier = [] if filtered else [k["id"] for sec in sections.values() for k in sec["keys"]]
        while frontier:  # the sub-keys of the keys on this page, level by level (they nest a few deep at most)
            kids = (await self.kp.keys.list(principal, parent_in=frontier, limit=SUBKEYS_PER_PAGE))["data"]
            for kid in kids:
                children[kid["parent_id"]].append(kid)
            frontier = [kid["id"] for kid in kids]
        profiles = await self.kp.limit_profiles.list(principal) if scope_rules.holds(
            principal.scopes, "limit_profiles:list") else []
        return self.dash._render(
            request, "keys.html", principal, session, status=status, filters=filters, sections=sections,
            children=children, profiles=profiles, data_scopes=sorted(scope_rules.DATA_PLANE_SCOPES),
            default_scopes=scope_rules.DEFAULT_KEY_SCOPES, clients=CLIENTS,
            recent_window=self.kp.settings.recent_use_window_seconds, now=datetime.now(UTC), **extra)

    async def keys(self, request: Request) -> Response:
        if request.method == "GET":
            principal, session = await self.dash._signed_in(request)
            return await self._keys_page(request, principal, session)
        principal, session, form = await self.dash._change(request)
        try:
            data = self._key_create(form)
            key, secret = await self.kp.keys.create(principal, data)
        except (KeyplaneError, ValidationError, ValueError) as exc:
            if isinstance(exc, KeyplaneError) and exc.status == 403:
                return self.dash._forbidden(request, principal, session, exc)
            return await self._keys_page(request, principal, session, status=_status_of(exc),
                                         create_error=_error_text(exc),
                                         form=dict(form))
        return await self._keys_page(request, principal, session, status=201, created=key, secret=secret)

    @staticmethod
    def _key_create(form: Any) -> KeyCreate:
        days = _optional_number(form, "expires_in_days")
        return KeyCreate(
            name=str(form.get("name") or ""), scopes=form.getlist("scopes") or None,
            expires_in=days * 86400 if days else None, ip_allowlist=_lines(form.get("ip_allowlist")),
            limit_profile=str(form.get("limit_profile") or "") or None,
            cost_center=str(form.get("cost_center") or "").strip() or None,
            environment=str(form.get("environment") or "").strip() or None,
            metadata=_pairs(form.get("metadata")))

    async def key_detail(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        key_id = request.path_params["key_id"]
        try:
            key = await self.kp.keys.get(principal, key_id)
            children = (await self.kp.keys.list(principal, parent_id=key_id, limit=200))["data"]
        except KeyplaneError as exc:
            return self.dash._render(request, "error.html", principal, session, status=exc.status, title="Not found",
                                code=exc.code, message=exc.message)
        usage = None
        if scope_rules.holds(principal.scopes, "usage:read"):
            since = request.query_params.get("since", "7d")
            usage = await usage_view(self.kp, principal, since if since in WINDOWS else "7d", key_id=key_id)
        names = await self.kp.principal_names.of(principal, [key["created_by"]])
        return self.dash._render(request, "key_detail.html", principal, session, key=key, children=children,
                            usage=usage, windows=WINDOWS, k=key, view="detail", names=names,
                            spend=await self.dash.key_spend.panel(principal, key_id),
                            recent_window=self.kp.settings.recent_use_window_seconds, now=datetime.now(UTC))

    async def key_card(self, request: Request) -> Response:
        principal, session = await self.dash._signed_in(request)
        key = await self.kp.keys.get(principal, request.path_params["key_id"])
        return self._card(request, principal, session, key)

    def _card(self, request: Request, principal: Principal, session: Session, key: dict[str, Any],
              status: int = 200, error: str | None = None) -> HTMLResponse:
        on_page = urlsplit(request.headers.get("hx-current-url", "")).path.rstrip("/")
        view = "detail" if on_page.endswith(f"/keys/{key['id']}") else "list"  # the page the card sits on
        return self.dash._render(request, "key_card.html", principal, session, status=status, k=key, children={},
                            error=error, recent_window=self.kp.settings.recent_use_window_seconds,
                            now=datetime.now(UTC), view=view)

    async def key_name(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if request.method == "GET":  # the inline editor
            principal, session = await self.dash._signed_in(request)
            key = await self.kp.keys.get(principal, key_id)
            return self.dash._render(request, "key_name_edit.html", principal, session, k=key)
        principal, session, form = await self.dash._change(request)
        try:
            key = await self.kp.keys.update(principal, key_id, KeyUpdate(name=str(form.get("name") or "")))
        except (KeyplaneError, ValidationError) as exc:
            key = await self.kp.keys.get(principal, key_id)
            return self._card(request, principal, session, key, status=_status_of(exc), error=_error_text(exc))
        return self._card(request, principal, session, key)

    async def key_status(self, request: Request) -> Response:
        principal, session, form = await self.dash._change(request)
        key_id = request.path_params["key_id"]
        try:
            key = await self.kp.keys.set_status(principal, key_id, enabled=form.get("enabled") == "true")
        except KeyplaneError as exc:
            key = await self.kp.keys.get(principal, key_id)
            return self._card(request, principal, session, key, status=exc.status, error=_error_text(exc))
        if not request.headers.get("hx-request"):
            return RedirectResponse(f"{PREFIX}/keys", status_code=303)
        if form.get("view") != "list" or key["parent_id"] is not None:
            return self._card(request, principal, session, key)  # a sub-key, or the detail page: in place
        # On the keys page a top-level key moves to its new section at once, and both counts follow.
        counts = {state: await self.kp.keys.count(principal, status=state, roots_only=True)
                  for state in ("enabled", "disabled")}
        return self.dash._render(request, "key_moved.html", principal, session, k=key, children={}, counts=counts,
                            view="list", recent_window=self.kp.settings.recent_use_window_seconds,
                            now=datetime.now(UTC))

    async def key_rotate(self, request: Request) -> Response:
        principal, session, form = await self.dash._change(request)
        try:
            grace = _optional_number(form, "grace_seconds") or 0
            key, secret = await self.kp.keys.rotate(principal, request.path_params["key_id"],
                                                    KeyRotate(grace_seconds=grace))
        except (KeyplaneError, ValidationError, ValueError) as exc:
            return await self._keys_page(request, principal, session, status=_status_of(exc),
                                         page_error=_error_text(exc))
        return await self._keys_page(request, principal, session, created=key, secret=secret, rotated=True)

    async def key_delete(self, request: Request) -> Response:
        principal, session, form = await self.dash._change(request)
        try:
            await self.kp.keys.delete(principal, request.path_params["key_id"], force=form.get("force") == "true")
        except KeyplaneError as exc:
            return await self._keys_page(request, principal, session, status=exc.status,
                                         page_error=_error_text(exc))
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    async def key_subkey(self, request: Request) -> Response:
        principal, session, form = await self.dash._change(request)
        try:
            key, secret = await self.kp.keys.create_subkey(principal, request.path_params["key_id"],
                                                           KeyCreate(name=str(form.get("name") or "")))
        except (KeyplaneError, ValidationError) as exc:
            return await self._keys_page(request, principal, session, status=_status_of(exc),
                                         page_error=_error_text(exc))
        return await self._keys_page(request, principal, session, status=201, created=key, secret=secret)
