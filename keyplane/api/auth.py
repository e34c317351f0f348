"""Control-plane authentication: the route's scope comes from the one table in domain/scopes.py."""

from __future__ import annotations

from fastapi import Request

from keyplane.domain.scopes import CONTROL_PLANE_ROUTES
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def keyplane_of(request: Request) -> Keyplane:
    return request.app.state.keyplane


async def principal(request: Request) -> Principal:
    """FastAPI dependency on every control-plane router (never on the data plane)."""
    kp = keyplane_of(request)
    who = await kp.authenticate_service_account(bearer_token(request.headers.get("authorization")),
                                               kp.client_address.of(request.scope))
    route = request.scope.get("route")
    template = getattr(route, "path_format", request.url.path)
    scope = CONTROL_PLANE_ROUTES.get((request.method, template))
    if scope is None:
        raise RuntimeError(f"route {request.method} {template} is missing from CONTROL_PLANE_ROUTES")
    who.require(scope)
    return who
