"""The control-plane FastAPI application (not on the hot path)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from keyplane import __version__
from keyplane.api import errors
from keyplane.api.routes import router
from keyplane.services.container import Keyplane


def build_api(kp: Keyplane) -> FastAPI:
    api = FastAPI(
        title="keyplane",
        version=__version__,
        description="Control plane for keyplane: virtual keys, service accounts, limit profiles, audit.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
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
