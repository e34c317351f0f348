"""Baseline (a): a bare Starlette endpoint that does what the cheapest possible key check does:
a dict lookup of the SHA-256 of the bearer token."""

from __future__ import annotations

import hashlib
import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_KEYS = {hashlib.sha256(t.encode()).hexdigest(): {"id": "k"} for t in json.loads(os.environ.get("BENCH_TOKENS", "[]"))}


async def check(request: Request) -> Response:
    auth = request.headers.get("authorization", "")
    found = _KEYS.get(hashlib.sha256(auth[7:].encode()).hexdigest())
    if found is None:
        return JSONResponse({"error": "invalid"}, status_code=401)
    return JSONResponse({"object": "list", "data": []})


app = Starlette(routes=[Route("/v1/models", check)])
