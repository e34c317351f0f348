"""The dashboard's pages and actions. Each handler reads a form, calls one service, renders a template.

Everything a page shows or does goes through the service layer with the signed-in principal, so the
scopes, the no-escalation rule, organization isolation and the audit trail are exactly the REST API's.
What the token's scopes do not allow is not offered (templates ask ``can(scope)``), and is refused by
the service if forced.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from keyplane.dashboard import charts
from keyplane.dashboard.session import COOKIE, LIFETIME_SECONDS, Session, new_session, open_session, seal
from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.connect import CLIENTS, connect_instructions, mcp_url_for
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal
from keyplane.services.schemas import (
    AlertRuleCreate,
    KeyCreate,
    KeyRotate,
    KeyUpdate,
    LimitProfileCreate,
    ProviderCreate,
    ProviderUpdate,
    ServiceAccountCreate,
)

log = logging.getLogger("keyplane.dashboard")
HERE = Path(__file__).parent
PREFIX = "/ui"
# Only our own scripts and styles (htmx is vendored), no framing (clickjacking), no sniffing, no referrer.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                 b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),  # pages may show a secret once: never from a cache
]
WINDOWS = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days"}


class NotSignedIn(Exception):
    pass


class CsrfFailed(Exception):
    pass


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 0:
        return "in " + _span(-seconds)
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return "seconds"


def _date(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value.replace("T", " ")[:16]
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _error_text(exc: KeyplaneError | ValidationError | ValueError) -> str:
    if isinstance(exc, KeyplaneError):
        return f"{exc.message} ({exc.code})"
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors())
    return str(exc)


def _status_of(exc: KeyplaneError | ValidationError | ValueError) -> int:
    """A refused change answers with the service's status (404, 409, …); bad form input with 400."""
    return exc.status if isinstance(exc, KeyplaneError) else 400


def _optional_number(form: Any, name: str, kind: type[int] | type[float] = int) -> Any:
    """A form field as a number, or None when empty; a clear message when it is not one."""
    raw = str(form.get(name) or "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}: {what}, not '{raw}'") from None


def _lines(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").replace(",", "\n").splitlines() if part.strip()]


def _model_prices(text: Any) -> list[dict[str, Any]]:
    """One model per line: ``name`` or ``name input output`` (USD per million tokens)."""
    models: list[dict[str, Any]] = []
    for line in str(text or "").splitlines():
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) not in (1, 3):
            raise ValueError(f"'{line.strip()}': write a model as 'name' or 'name input-price output-price'")
        model: dict[str, Any] = {"name": parts[0]}
        if len(parts) == 3:
            try:
                model.update(input_per_mtok=float(parts[1]), output_per_mtok=float(parts[2]))
            except ValueError:
                raise ValueError(f"'{line.strip()}': prices are numbers, in USD per million tokens") from None
        models.append(model)
    return models


def _pairs(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        if "=" not in line:
            raise ValueError(f"metadata: write key=value, one per line (not '{line.strip()}')")
        k, _, v = line.partition("=")
        out[k.strip()] = v.strip()
    return out


class Dashboard:
    def __init__(self, kp: Keyplane) -> None:
        self.kp = kp
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters.update(ago=_ago, date=_date)
        self.app = Starlette(routes=[Mount(PREFIX, routes=[
            Route("/", self.home),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/keys", self.keys, methods=["GET", "POST"]),
            Route("/keys/{key_id}", self.key_detail),
            Route("/keys/{key_id}/card", self.key_card),
            Route("/keys/{key_id}/name", self.key_name, methods=["GET", "POST"]),
            Route("/keys/{key_id}/status", self.key_status, methods=["POST"]),
            Route("/keys/{key_id}/rotate", self.key_rotate, methods=["POST"]),
            Route("/keys/{key_id}/delete", self.key_delete, methods=["POST"]),
            Route("/keys/{key_id}/subkeys", self.key_subkey, methods=["POST"]),
            Route("/connect", self.connect, methods=["GET"]),
            Route("/connect/mint", self.connect_mint, methods=["POST"]),
            Route("/service-accounts", self.service_accounts, methods=["GET", "POST"]),
            Route("/service-accounts/{sa_id}/revoke", self.sa_revoke, methods=["POST"]),
            Route("/limit-profiles", self.limit_profiles, methods=["GET", "POST"]),
            Route("/providers", self.providers, methods=["GET", "POST"]),
            Route("/providers/{name}/delete", self.provider_delete, methods=["POST"]),
            Route("/providers/{name}/update", self.provider_update, methods=["POST"]),
            Route("/alerts", self.alerts, methods=["GET", "POST"]),
            Route("/alerts/{rule_id}/delete", self.alert_delete, methods=["POST"]),
            Route("/usage", self.usage),
            Route("/audit", self.audit),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ])], exception_handlers={NotSignedIn: self._to_login, CsrfFailed: self._csrf_failed,
                                 KeyplaneError: self._refused})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == PREFIX:
            scope = dict(scope, path=PREFIX + "/", raw_path=(PREFIX + "/").encode())

        async def send_with_policy(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *SECURITY_HEADERS])
            await send(message)

        await self.app(scope, receive, send_with_policy)

    # -- sessions -----------------------------------------------------------------------------------

    async def _signed_in(self, request: Request) -> tuple[Principal, Session]:
        session = open_session(self.kp.secret_box(), request.cookies.get(COOKIE))
        if session is None:
            raise NotSignedIn
        try:
            principal = await self.kp.authenticate_service_account(session.token)
        except KeyplaneError:
            raise NotSignedIn from None  # revoked since sign-in: the session ends with the token
        return principal, session

    async def _change(self, request: Request) -> tuple[Principal, Session, Any]:
        """A state-changing request: signed in, and carrying this session's CSRF token."""
        principal, session = await self._signed_in(request)
        form = await request.form()
        presented = request.headers.get("x-csrf-token") or form.get("csrf")
        if not session.csrf_ok(presented if isinstance(presented, str) else None):
            raise CsrfFailed
        return principal, session, form

    async def _to_login(self, request: Request, exc: Exception) -> Response:
        target = f"{PREFIX}/login?" + urlencode({"next": request.url.path})
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": target})
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    async def _csrf_failed(self, request: Request, exc: Exception) -> Response:
        return self.templates.TemplateResponse(request, "error.html", {
            "title": "Refused", "code": "csrf_failed",
            "message": "This change did not carry the page's CSRF token. Reload the page and try again."},
            status_code=403)

    async def _refused(self, request: Request, exc: Exception) -> Response:
        """A service refusal no handler caught (a page the token's scopes do not cover, an unknown id)."""
        assert isinstance(exc, KeyplaneError)
        return self.templates.TemplateResponse(request, "error.html", {
            "title": "Refused" if exc.status == 403 else "Not possible", "code": exc.code, "message": exc.message,
            "prefix": PREFIX, "principal": None, "csrf": "", "can": lambda scope: False}, status_code=exc.status)

    def _render(self, request: Request, template: str, principal: Principal | None, session: Session | None,
                status: int = 200, **context: Any) -> HTMLResponse:
        held = principal.scopes if principal else frozenset()
        return self.templates.TemplateResponse(request, template, {
            "principal": principal, "csrf": session.csrf if session else "", "prefix": PREFIX,
            "can": lambda scope: scope_rules.holds(held, scope), **context}, status_code=status)

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    async def login(self, request: Request) -> Response:
        target = request.query_params.get("next") or f"{PREFIX}/keys"
        if not target.startswith(PREFIX + "/"):
            target = f"{PREFIX}/keys"  # never redirect off the dashboard
        if request.method == "GET":
            return self._render(request, "login.html", None, None, next=target)
        form = await request.form()
        token = str(form.get("token") or "").strip()
        try:
            # Wrong tokens count towards the failed-authentication brake of the caller's address.
            await self.kp.authenticate_service_account(token, self.kp.client_address.of(request.scope))
        except KeyplaneError as exc:
            return self._render(request, "login.html", None, None, status=exc.status, next=target,
                                error=f"{exc.message} ({exc.code})")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, seal(self.kp.secret_box(), new_session(token)), max_age=LIFETIME_SECONDS,
                            path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        await self._change(request)
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # -- keys -----------------------------------------------------------------------------------------

    async def _keys_page(self, request: Request, principal: Principal, session: Session, status: int = 200,
                         **extra: Any) -> HTMLResponse:
        params = request.query_params
        filters = {k: params.get(k) or None for k in ("cost_center", "environment", "q")}
        keys: list[dict[str, Any]] = []
        cursor = None
        while True:  # every key: the page groups sub-keys under their parents
            page = await self.kp.keys.list(principal, cursor=cursor, limit=200, **filters)
            keys += page["data"]
            cursor = page["next_cursor"]
            if not cursor or len(keys) >= 2000:
                break
        by_parent: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
        ids = {k["id"] for k in keys}
        for k in keys:
            by_parent[k["parent_id"] if k["parent_id"] in ids else None].append(k)
        roots = by_parent[None]
        profiles = await self.kp.limit_profiles.list(principal) if scope_rules.holds(
            principal.scopes, "limit_profiles:list") else []
        return self._render(
            request, "keys.html", principal, session, status=status, filters=filters,
            enabled=[k for k in roots if k["status"] == "enabled"],
            disabled=[k for k in roots if k["status"] != "enabled"], children=by_parent,
            profiles=profiles, data_scopes=sorted(scope_rules.DATA_PLANE_SCOPES),
            default_scopes=scope_rules.DEFAULT_KEY_SCOPES, clients=CLIENTS,
            recent_window=self.kp.settings.recent_use_window_seconds, now=datetime.now(UTC), **extra)

    async def keys(self, request: Request) -> Response:
        if request.method == "GET":
            principal, session = await self._signed_in(request)
            return await self._keys_page(request, principal, session)
        principal, session, form = await self._change(request)
        try:
            data = self._key_create(form)
            key, secret = await self.kp.keys.create(principal, data)
        except (KeyplaneError, ValidationError, ValueError) as exc:
            if isinstance(exc, KeyplaneError) and exc.status == 403:
                return self._forbidden(request, principal, session, exc)
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
        principal, session = await self._signed_in(request)
        key_id = request.path_params["key_id"]
        try:
            key = await self.kp.keys.get(principal, key_id)
            children = (await self.kp.keys.list(principal, parent_id=key_id, limit=200))["data"]
        except KeyplaneError as exc:
            return self._render(request, "error.html", principal, session, status=exc.status, title="Not found",
                                code=exc.code, message=exc.message)
        usage = None
        if scope_rules.holds(principal.scopes, "usage:read"):
            since = request.query_params.get("since", "7d")
            usage = await self._usage_view(principal, since if since in WINDOWS else "7d", key_id=key_id)
        return self._render(request, "key_detail.html", principal, session, key=key, children=children,
                            usage=usage, windows=WINDOWS)

    async def key_card(self, request: Request) -> Response:
        principal, session = await self._signed_in(request)
        key = await self.kp.keys.get(principal, request.path_params["key_id"])
        return self._card(request, principal, session, key)

    def _card(self, request: Request, principal: Principal, session: Session, key: dict[str, Any],
              status: int = 200, error: str | None = None) -> HTMLResponse:
        return self._render(request, "key_card.html", principal, session, status=status, k=key, children={},
                            error=error, recent_window=self.kp.settings.recent_use_window_seconds,
                            now=datetime.now(UTC))

    async def key_name(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if request.method == "GET":  # the inline editor
            principal, session = await self._signed_in(request)
            key = await self.kp.keys.get(principal, key_id)
            return self._render(request, "key_name_edit.html", principal, session, k=key)
        principal, session, form = await self._change(request)
        try:
            key = await self.kp.keys.update(principal, key_id, KeyUpdate(name=str(form.get("name") or "")))
        except (KeyplaneError, ValidationError) as exc:
            key = await self.kp.keys.get(principal, key_id)
            return self._card(request, principal, session, key, status=_status_of(exc), error=_error_text(exc))
        return self._card(request, principal, session, key)

    async def key_status(self, request: Request) -> Response:
        principal, session, form = await self._change(request)
        key_id = request.path_params["key_id"]
        try:
            key = await self.kp.keys.set_status(principal, key_id, enabled=form.get("enabled") == "true")
        except KeyplaneError as exc:
            key = await self.kp.keys.get(principal, key_id)
            return self._card(request, principal, session, key, status=exc.status, error=_error_text(exc))
        if request.headers.get("hx-request"):
            return self._card(request, principal, session, key)
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    async def key_rotate(self, request: Request) -> Response:
        principal, session, form = await self._change(request)
        try:
            grace = _optional_number(form, "grace_seconds") or 0
            key, secret = await self.kp.keys.rotate(principal, request.path_params["key_id"],
                                                    KeyRotate(grace_seconds=grace))
        except (KeyplaneError, ValidationError, ValueError) as exc:
            return await self._keys_page(request, principal, session, status=_status_of(exc),
                                         page_error=_error_text(exc))
        return await self._keys_page(request, principal, session, created=key, secret=secret, rotated=True)

    async def key_delete(self, request: Request) -> Response:
        principal, session, form = await self._change(request)
        try:
            await self.kp.keys.delete(principal, request.path_params["key_id"], force=form.get("force") == "true")
        except KeyplaneError as exc:
            return await self._keys_page(request, principal, session, status=exc.status,
                                         page_error=_error_text(exc))
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    async def key_subkey(self, request: Request) -> Response:
        principal, session, form = await self._change(request)
        try:
            key, secret = await self.kp.keys.create_subkey(principal, request.path_params["key_id"],
                                                           KeyCreate(name=str(form.get("name") or "")))
        except (KeyplaneError, ValidationError) as exc:
            return await self._keys_page(request, principal, session, status=_status_of(exc),
                                         page_error=_error_text(exc))
        return await self._keys_page(request, principal, session, status=201, created=key, secret=secret)

    # -- connect an agent -------------------------------------------------------------------------------

    def _guide(self, client: str, token: str | None) -> Any:
        return connect_instructions(client if client in CLIENTS else "claude-code",
                                    mcp_url_for(self.kp.settings.base_url), token,
                                    query_token_enabled=self.kp.settings.mcp_query_token)

    async def connect(self, request: Request) -> Response:
        principal, session = await self._signed_in(request)
        client = request.query_params.get("client", "claude-code")
        agents = []
        if scope_rules.holds(principal.scopes, "service_accounts:manage"):
            agents = [a for a in await self.kp.service_accounts.list(principal) if "agent" in a["name"]]
        template = "connect.html" if request.headers.get("hx-request") else "connect_page.html"
        return self._render(request, template, principal, session, guide=self._guide(client, None),
                            clients=CLIENTS, client=client, has_agents=bool(agents), minted=None)

    async def connect_mint(self, request: Request) -> Response:
        principal, session, form = await self._change(request)
        client = str(form.get("client") or "claude-code")
        try:
            minted, token = await self.kp.service_accounts.mint_agent_token(principal, CLIENTS.get(client, client))
        except KeyplaneError as exc:
            return self._render(request, "connect.html", principal, session, status=exc.status,
                                guide=self._guide(client, None), clients=CLIENTS, client=client, has_agents=True,
                                minted=None, error=_error_text(exc))
        return self._render(request, "connect.html", principal, session, guide=self._guide(client, token),
                            clients=CLIENTS, client=client, has_agents=True, minted=minted)

    # -- service accounts, profiles, providers ----------------------------------------------------------

    async def _list_and_create(
        self, request: Request, template: str, create: Callable[[Principal, Any], Awaitable[Any]],
        listing: Callable[[Principal], Awaitable[list[dict[str, Any]]]],
        context: Callable[[Principal], Awaitable[dict[str, Any]]] | None = None, **extra: Any,
    ) -> Response:
        """The shape of the accounts, profiles, providers and alerts pages: a list, and a form that adds to
        it. ``context`` adds what the form needs to know about the signed-in principal."""
        created: Any = None
        error = None
        status = 200
        if request.method == "POST":
            principal, session, form = await self._change(request)
            try:
                created = await create(principal, form)
                status = 201
            except (KeyplaneError, ValidationError, ValueError) as exc:
                if isinstance(exc, KeyplaneError) and exc.status == 403:
                    return self._forbidden(request, principal, session, exc)
                error, status = _error_text(exc), 400
        else:
            principal, session = await self._signed_in(request)
        try:
            items = await listing(principal)
            if context is not None:
                extra.update(await context(principal))
        except KeyplaneError as exc:
            return self._forbidden(request, principal, session, exc)
        return self._render(request, template, principal, session, status=status, items=items, created=created,
                            error=error, **extra)

    async def service_accounts(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> tuple[dict[str, Any], str]:
            return await self.kp.service_accounts.create(principal, ServiceAccountCreate(
                name=str(form.get("name") or ""), scopes=form.getlist("scopes"),
                description=str(form.get("description") or "") or None))

        async def listing(principal: Principal) -> list[dict[str, Any]]:
            return await self.kp.service_accounts.list(principal, include_revoked=True)

        return await self._list_and_create(
            request, "service_accounts.html", create, listing,
            all_scopes=sorted(scope_rules.CONTROL_PLANE_SCOPES - {scope_rules.ADMIN}),
            data_scopes=sorted(scope_rules.DATA_PLANE_SCOPES))

    async def _act_then_return(self, request: Request, action: Callable[[Principal], Awaitable[Any]],
                               back_to: str) -> Response:
        """A one-button change (revoke, delete): do it, then back to the list it was made from."""
        principal, session, _form = await self._change(request)
        try:
            await action(principal)
        except KeyplaneError as exc:
            return self._forbidden(request, principal, session, exc)
        return RedirectResponse(f"{PREFIX}/{back_to}", status_code=303)

    async def sa_revoke(self, request: Request) -> Response:
        sa_id = request.path_params["sa_id"]
        return await self._act_then_return(
            request, lambda principal: self.kp.service_accounts.revoke(principal, sa_id), "service-accounts")

    async def limit_profiles(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> dict[str, Any]:
            return await self.kp.limit_profiles.create(principal, LimitProfileCreate(
                name=str(form.get("name") or ""), description=str(form.get("description") or "") or None,
                requests_per_minute=_optional_number(form, "requests_per_minute"),
                tokens_per_minute=_optional_number(form, "tokens_per_minute"),
                cost_per_day_usd=_optional_number(form, "cost_per_day_usd", float),
                budget_per_month_usd=_optional_number(form, "budget_per_month_usd", float)))

        return await self._list_and_create(request, "limit_profiles.html", create, self.kp.limit_profiles.list)

    async def providers(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> dict[str, Any]:
            return await self.kp.providers.create(principal, ProviderCreate.model_validate({
                "name": str(form.get("name") or ""), "base_url": str(form.get("base_url") or ""),
                "api_key": str(form.get("api_key") or "") or None,
                "models": _model_prices(form.get("models"))}))

        return await self._list_and_create(request, "providers.html", create, self.kp.providers.list)

    async def provider_update(self, request: Request) -> Response:
        """Change a provider's models and prices, and rotate its secret (left blank: kept)."""
        name = request.path_params["name"]
        principal, session, form = await self._change(request)
        try:
            changes: dict[str, Any] = {"models": _model_prices(form.get("models"))}
            if str(form.get("api_key") or ""):
                changes["api_key"] = str(form.get("api_key"))
            await self.kp.providers.update(principal, name, ProviderUpdate.model_validate(changes))
        except (KeyplaneError, ValidationError, ValueError) as exc:
            if isinstance(exc, KeyplaneError) and exc.status in (403, 404):
                return self._forbidden(request, principal, session, exc)
            items = await self.kp.providers.list(principal)
            return self._render(request, "providers.html", principal, session, status=_status_of(exc), items=items,
                                created=None, error=f"{name}: {_error_text(exc)}")
        return RedirectResponse(f"{PREFIX}/providers", status_code=303)

    async def provider_delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        return await self._act_then_return(
            request, lambda principal: self.kp.providers.delete(principal, name), "providers")

    async def alerts(self, request: Request) -> Response:
        async def create(principal: Principal, form: Any) -> tuple[dict[str, Any], str]:
            fields: dict[str, Any] = {
                "name": str(form.get("name") or ""), "kind": str(form.get("kind") or ""),
                "key_id": str(form.get("key_id") or "") or None,
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
                rule["webhook_host"] = urlsplit(rule.pop("webhook_url")).netloc
            return rules

        async def keys_to_watch(principal: Principal) -> dict[str, Any]:
            keys: list[dict[str, Any]] = []
            if scope_rules.holds(principal.scopes, "virtual_keys:read"):
                keys = (await self.kp.keys.list(principal, status="enabled", limit=200))["data"]
            return {"keys": keys, "key_names": {k["id"]: k["name"] for k in keys}}

        return await self._list_and_create(request, "alerts.html", create, listing, keys_to_watch,
                                           interval=int(self.kp.settings.alert_interval_seconds))

    async def alert_delete(self, request: Request) -> Response:
        rule_id = request.path_params["rule_id"]
        return await self._act_then_return(
            request, lambda principal: self.kp.alerts.delete(principal, rule_id), "alerts")

    def _forbidden(self, request: Request, principal: Principal, session: Session, exc: KeyplaneError) -> Response:
        return self._render(request, "error.html", principal, session, status=exc.status, title="Refused",
                            code=exc.code, message=exc.message)

    # -- usage and audit -------------------------------------------------------------------------------------

    async def _usage_view(self, principal: Principal, since: str, key_id: str | None = None) -> dict[str, Any]:
        slot = "hour" if since == "24h" else "day"
        timeline = (await self.kp.usage.summary(principal, since=since, group_by=slot, key_id=key_id))["data"]
        by_slot = {row["group"]: row for row in timeline}
        now = datetime.now(UTC)
        if slot == "hour":
            labels = [(now - timedelta(hours=h)).strftime("%Y-%m-%dT%H:00") for h in range(23, -1, -1)]
        else:
            days = 7 if since == "7d" else 30
            labels = [(now - timedelta(days=d)).strftime("%Y-%m-%d") for d in range(days - 1, -1, -1)]

        def at(label: str, field: str) -> float:
            for group, row in by_slot.items():
                if str(group).startswith(label):
                    return float(row[field])
            return 0.0

        short = [label[11:16] if slot == "hour" else label[5:] for label in labels]
        requests_chart = charts.bars_over_time(
            f"Requests and errors per {slot}", short,
            [charts.Series("requests", [at(x, "requests") for x in labels], "bar-main"),
             charts.Series("errors", [at(x, "errors") for x in labels], "bar-error")])
        result: dict[str, Any] = {"since": since, "slot": slot, "requests_chart": requests_chart,
                                  "timeline": [(short[i], at(x, "requests"), at(x, "errors"))
                                               for i, x in enumerate(labels)]}
        groups = ("model", "cost_center") if key_id else ("model", "cost_center", "key")
        for group in groups:
            rows = (await self.kp.usage.summary(principal, since=since, group_by=group, key_id=key_id))["data"]
            result[group] = rows
        result["tokens_by_model"] = charts.horizontal_bars(
            "Tokens by model", [(r["group"] or "—", r["total_tokens"]) for r in result["model"]])
        result["cost_by_model"] = charts.horizontal_bars(
            "Cost by model (USD)", [(r["group"] or "—", r["cost_usd"]) for r in result["model"]], " $")
        result["cost_by_cost_center"] = charts.horizontal_bars(
            "Cost by cost center (USD)", [(r["group"] or "—", r["cost_usd"]) for r in result["cost_center"]], " $")
        result["tokens_by_cost_center"] = charts.horizontal_bars(
            "Tokens by cost center", [(r["group"] or "—", r["total_tokens"]) for r in result["cost_center"]])
        return result

    async def usage(self, request: Request) -> Response:
        principal, session = await self._signed_in(request)
        since = request.query_params.get("since", "24h")
        since = since if since in WINDOWS else "24h"
        try:
            view = await self._usage_view(principal, since)
        except KeyplaneError as exc:
            return self._forbidden(request, principal, session, exc)
        names = {}
        if scope_rules.holds(principal.scopes, "virtual_keys:read"):
            page = await self.kp.keys.list(principal, limit=200)
            names = {k["id"]: k["name"] for k in page["data"]}
        top = [(names.get(r["group"], r["group"] or "—"), r) for r in view["key"][:10]]
        view["top_keys_chart"] = charts.horizontal_bars("Top keys by requests", [(n, r["requests"]) for n, r in top])
        return self._render(request, "usage.html", principal, session, usage=view, top=top, windows=WINDOWS)

    async def audit(self, request: Request) -> Response:
        principal, session = await self._signed_in(request)
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
                return self._render(request, "audit.html", principal, session, status=400, events=[],
                                    next_cursor=None, filters=filters, verdict=None, error=_error_text(exc))
            return self._forbidden(request, principal, session, exc)
        next_link = None
        if page["next_cursor"]:
            next_link = "?" + urlencode({**{k: v for k, v in filters.items() if v}, "cursor": page["next_cursor"]})
        labels = [d["date"][5:] for d in activity["days"]]  # MM-DD
        activity_chart = charts.bars_over_time(
            "Changes recorded per day, last 14 days (UTC)", labels,
            [charts.Series("changes", [float(d["events"]) for d in activity["days"]], "bar-main")])
        actions_chart = charts.horizontal_bars(
            "Most frequent actions, last 14 days", [(a["action"], float(a["events"])) for a in activity["top_actions"]])
        return self._render(request, "audit.html", principal, session, events=page["data"], next_link=next_link,
                            filters=filters, verdict=verdict, error=None, activity=activity,
                            activity_chart=activity_chart, actions_chart=actions_chart)
