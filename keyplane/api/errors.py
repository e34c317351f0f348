"""Every control-plane failure leaves in the one error shape; nothing leaks a stack trace or a secret."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from keyplane.domain import secret_scan
from keyplane.domain.errors import KeyplaneError, error_type_for

log = logging.getLogger("keyplane.api")

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

# What a lost database connection surfaces as (SQLAlchemy's wrappers, or the driver's socket errors).
STORE_UNREACHABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, DisconnectionError,
                                                  ConnectionError, TimeoutError)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "type": error_type_for(status, code), **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"{loc}: {msg}" if loc else msg


async def _keyplane_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KeyplaneError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "invalid_request", "The request body is not valid JSON")
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return error_response(
            415, "invalid_request", f"Send a JSON body with 'Content-Type: application/json' (got '{content_type}')"
        )
    # A location may name a map key the caller sent (metadata): never echo a secret back, even to its sender.
    details = [{"field": secret_scan.mask_text(".".join(str(p) for p in e.get("loc", ()))),
                "problem": secret_scan.mask_text(_describe(e))} for e in errors[:20]]
    message = "; ".join(d["problem"] for d in details) or "Invalid request"
    return error_response(422, "invalid_request", message, details=details)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route that matched)."""
    allowed = set()
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.add(method)
    return ", ".join(sorted(allowed))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(404, "not_found", "No such route")
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        return error_response(405, "method_not_allowed", f"Method not allowed on this route; use {allowed}",
                              headers={**(exc.headers or {}), "Allow": allowed})
    return error_response(exc.status_code, "invalid_request", str(exc.detail), headers=exc.headers)


async def _store_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """The database is unreachable: the change was not made (its transaction never committed)."""
    log.error("store unreachable: %s", type(exc).__name__)
    return error_response(503, "store_unavailable", "The store cannot be reached right now; nothing was changed. "
                          "Retry shortly", headers={"Retry-After": "1"})


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "An internal error occurred; it has been logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(KeyplaneError, _keyplane_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for unreachable in STORE_UNREACHABLE:
        app.add_exception_handler(unreachable, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
