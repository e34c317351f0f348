"""An answer whose provider reports no usage still spends (issue 17): it settles from its reservation.

Responses' ``background: true`` (a client's choice) answers at once with ``"status": "queued"`` and no usage,
then generates and bills the answer upstream; some OpenAI-compatible servers never report usage at all. Were
such answers counted as free, a budget would never bind: every one of them released its reservation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key
from tests.processes import serve
from tests.test_budgets import make_profile, settled_usd

OUTPUT_PER_MTOK = 100.0


async def _responses(request: Request) -> JSONResponse:
    body = await request.json()
    # As OpenAI answers a background request: queued, no usage yet (the answer is generated afterwards).
    return JSONResponse({"id": "resp_1", "object": "response", "status": "queued", "model": body.get("model"),
                         "output": [], "usage": None})


@pytest.fixture
async def quiet_upstream(client: httpx.AsyncClient, admin: dict[str, str]) -> AsyncIterator[None]:
    app = Starlette(routes=[Route("/v1/responses", _responses, methods=["POST"])])
    async with serve(app) as url:
        body = {"name": "quiet", "base_url": f"{url}/v1", "api_key": "sk-x", "timeout_seconds": 5,
                "models": [{"name": "quiet-model", "input_per_mtok": 1.0, "output_per_mtok": OUTPUT_PER_MTOK}]}
        resp = await client.post("/api/v1/providers", json=body, headers=admin)
        assert resp.status_code == 201, resp.text
        yield


@pytest.mark.usefixtures("quiet_upstream")
async def test_answers_without_usage_spend_their_reservation(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str],
) -> None:
    request: dict[str, Any] = {"model": "quiet-model", "input": "write a novel", "background": True,
                               "max_output_tokens": 1000}
    worst = 1000 * OUTPUT_PER_MTOK / 1e6  # $0.10 of output, plus a few prompt tokens
    limit = 3.5 * worst
    profile = await make_profile(client, admin, "three", cost_per_day_usd=limit)
    key, secret = await create_key(client, admin, limit_profile=profile)
    answers = [await client.post("/v1/responses", json=request, headers=bearer(secret)) for _ in range(10)]
    served = [r for r in answers if r.status_code == 200]
    for r in answers:
        if r.status_code != 200:
            assert assert_error(r, 429, "budget_exceeded")["limit"] == "cost_per_day_usd"
    assert len(served) == 4, [r.status_code for r in answers]  # three whole, the fourth clamped to what is left
    assert int(served[3].headers["x-keyplane-max-tokens-clamped"]) < 1000
    assert 3 * worst <= await settled_usd(app, client, admin, key["id"]) <= limit
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)
