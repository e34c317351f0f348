"""Signing in and out of the dashboard with a service-account token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from keyplane.dashboard import PREFIX
from keyplane.dashboard.session import COOKIE, LIFETIME_SECONDS, new_session, seal
from keyplane.domain.errors import KeyplaneError

if TYPE_CHECKING:
    from keyplane.dashboard.app import Dashboard


class SignInPage:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dash = dashboard
        self.kp = dashboard.kp

    def routes(self) -> list[Route]:
        return [
            Route("/", self.home),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
        ]

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    async def login(self, request: Request) -> Response:
        target = request.query_params.get("next") or f"{PREFIX}/keys"
        if not target.startswith(PREFIX + "/"):
            target = f"{PREFIX}/keys"  # never redirect off the dashboard
        if request.method == "GET":
            return self.dash._render(request, "login.html", None, None, next=target)
        form = await request.form()
        token = str(form.get("token") or "").strip()
        try:
            # Wrong tokens count towards the failed-authentication brake of the caller's address.
            await self.kp.authenticate_service_account(token, self.kp.client_address.of(request.scope))
        except KeyplaneError as exc:
            return self.dash._render(request, "login.html", None, None, status=exc.status, next=target,
                                error=f"{exc.message} ({exc.code})")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, seal(self.kp.secret_box(), new_session(token)), max_age=LIFETIME_SECONDS,
                            path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        await self.dash._change(request)
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response
