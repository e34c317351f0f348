"""The dashboard's pages and actions. Each handler reads a form, calls one service, renders a template.

Everything a page shows or does goes through the service layer with the signed-in principal, so the
scopes, the no-escalation rule, organization isolation and the audit trail are exactly the REST API's.
What the token's scopes do not allow is not offered (templates ask ``can(scope)``), and is refused by
the service if forced.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from keyplane.dashboard import PREFIX
from keyplane.dashboard.alerts import AlertsPage
from keyplane.dashboard.audit import AuditPage
from keyplane.dashboard.connect import ConnectPage
from keyplane.dashboard.formatting import _ago, _date, _thousands
from keyplane.dashboard.forms import _error_text, _lines, _optional_number, _pairs, _status_of
from keyplane.dashboard.key_spend import KeySpendPanel
from keyplane.dashboard.keys import KEYS_PER_PAGE, SUBKEYS_PER_PAGE, KeysPage
from keyplane.dashboard.limit_profiles import LimitProfilesPage
from keyplane.dashboard.mcp_servers import McpServersPage
from keyplane.dashboard.providers import ProvidersPage, _model_prices
from keyplane.dashboard.service_accounts import ServiceAccountsPage
from keyplane.dashboard.session import COOKIE, Session, open_session
from keyplane.dashboard.sign_in import SignInPage
from keyplane.dashboard.usage import WINDOWS, UsagePage
from keyplane.domain import money
from keyplane.domain import scopes as scope_rules
from keyplane.domain.errors import KeyplaneError
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal

# What other modules may import from here: the names this module held before it was split by page.
__all__ = ["KEYS_PER_PAGE", "PREFIX", "SUBKEYS_PER_PAGE", "WINDOWS", "CsrfFailed", "Dashboard", "NotSignedIn",
           "_ago", "_date", "_error_text", "_lines", "_model_prices", "_optional_number", "_pairs", "_status_of",
           "_thousands"]

log = logging.getLogger("keyplane.dashboard")
HERE = Path(__file__).parent
# Only our own scripts and styles (htmx is vendored), no framing (clickjacking), no sniffing, no referrer.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                 b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),  # pages may show a secret once: never from a cache
]


class NotSignedIn(Exception):
    pass


class CsrfFailed(Exception):
    pass


class Dashboard:
    """The dashboard's application: one page object per page family, and what every page shares (signing in,
    the CSRF check, rendering, refusals, the list-and-create shape)."""

    def __init__(self, kp: Keyplane) -> None:
        self.kp = kp
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters.update(ago=_ago, date=_date, usd=money.usd, thousands=_thousands)
        self.sign_in_page = SignInPage(self)
        self.keys_page = KeysPage(self)
        self.connect_page = ConnectPage(self)
        self.service_accounts_page = ServiceAccountsPage(self)
        self.limit_profiles_page = LimitProfilesPage(self)
        self.providers_page = ProvidersPage(self)
        self.mcp_servers_page = McpServersPage(self)
        self.key_spend = KeySpendPanel(self)
        self.alerts_page = AlertsPage(self)
        self.usage_page = UsagePage(self)
        self.audit_page = AuditPage(self)
        self.app = Starlette(routes=[Mount(PREFIX, routes=[
            *self.sign_in_page.routes(),
            *self.keys_page.routes(),
            *self.connect_page.routes(),
            *self.service_accounts_page.routes(),
            *self.limit_profiles_page.routes(),
            *self.providers_page.routes(),
            *self.mcp_servers_page.routes(),
            *self.key_spend.routes(),
            *self.alerts_page.routes(),
            *self.usage_page.routes(),
            *self.audit_page.routes(),
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

    # -- the shapes the pages share ---------------------------------------------------------------------

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

    async def _act_then_return(self, request: Request, action: Callable[[Principal], Awaitable[Any]],
                               back_to: str) -> Response:
        """A one-button change (revoke, delete): do it, then back to the list it was made from."""
        principal, session, _form = await self._change(request)
        try:
            await action(principal)
        except KeyplaneError as exc:
            return self._forbidden(request, principal, session, exc)
        return RedirectResponse(f"{PREFIX}/{back_to}", status_code=303)

    def _forbidden(self, request: Request, principal: Principal, session: Session, exc: KeyplaneError) -> Response:
        return self._render(request, "error.html", principal, session, status=exc.status, title="Refused",
                            code=exc.code, message=exc.message)
