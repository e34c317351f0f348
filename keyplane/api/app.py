"""The control-plane FastAPI application (not on the hot path)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import text

from keyplane import __version__
from keyplane.api import errors
from keyplane.api.routes import router
from keyplane.services.container import Keyplane

DOCS_ASSETS = "/docs/assets"


def build_api(kp: Keyplane) -> FastAPI:
    # Swagger UI from the assets fastapi-offline ships (no CDN): /docs works on a host with no internet.
    api = FastAPIOffline(
        title="keyplane",
        version=__version__,
        description="Control plane for keyplane: virtual keys, service accounts, limit profiles, audit.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    api.state.keyplane = kp
    errors.install(api)
    api.include_router(router)

    @api.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @api.get("/readyz", tags=["health"], response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        try:
            async with kp.db.read() as s:
                await s.execute(text("SELECT 1"))
        except Exception:
            return errors.error_response(503, "not_ready", "The database is not reachable")
        return {"status": "ready", "database": "sqlite" if kp.db.is_sqlite else "postgresql"}

    return api
