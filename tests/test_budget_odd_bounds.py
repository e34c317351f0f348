"""A request's output bound and choices as an upstream reads them, not only as keyplane does (issue 17).

Many OpenAI-compatible servers (vLLM, SGLang, LiteLLM: pydantic in lax mode) read ``"100000"`` and
``100000.0`` as the integer 100000, and ``n``/``best_of`` the same way; vLLM takes ``max_completion_tokens``
over ``max_tokens``. A bound or a choice count keyplane does not count must not reach the upstream unchecked:
else a request reserves 5 output tokens and generates 100,000, past any budget.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key
from tests.fake_upstream import FakeUpstream
from tests.test_budgets import CHAT, make_profile, provider, upstream  # noqa: F401  # fixtures

MESSAGES = [{"role": "user", "content": "hi"}]


def lax_int(value: Any) -> int | None:
    """What a pydantic (lax) upstream makes of an integer field."""
    if value is None:
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def generated_at_most(sent: dict[str, Any]) -> int:
    """The output tokens a lax upstream may generate for ``sent``: its largest bound times its choices."""
    bounds = [b for b in (lax_int(sent.get(f)) for f in ("max_tokens", "max_completion_tokens")) if b]
    choices = max([c for c in (lax_int(sent.get("n")), lax_int(sent.get("best_of"))) if c] or [1])
    return max(bounds) * choices if bounds else 10**9


@pytest.mark.parametrize(("body", "reserved"), [
    ({"max_tokens": 5, "max_completion_tokens": "100000"}, 5),
    ({"max_tokens": 5, "max_completion_tokens": 100000.0}, 5),
    ({"max_completion_tokens": 5, "max_tokens": "100000"}, 5),
    ({"max_tokens": 5, "n": "8"}, 5),
    ({"max_tokens": 5, "n": 8.0}, 5),
    ({"n": "8"}, 4096),
    ({"max_completion_tokens": "100000"}, 4096),  # no int bound beside it: the field set is another one
    ({"max_tokens": None, "max_completion_tokens": 1e5}, 4096),
])
@pytest.mark.usefixtures("provider")
async def test_a_bound_or_a_choice_count_keyplane_does_not_count_is_not_forwarded(
    client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str],  # noqa: F811
    body: dict[str, Any], reserved: int,
) -> None:
    fake, _ = upstream
    profile = await make_profile(client, admin, "roomy", cost_per_day_usd=100.0)
    _key, secret = await create_key(client, admin, limit_profile=profile)
    request = {"model": "metered-model", "messages": MESSAGES, **body}
    for _ in range(2):  # the key's first request seeds its windows (the rule), the second may take its plan
        sent_before = len(fake.requests)
        resp = await client.post(CHAT, json=request, headers=bearer(secret))
        if resp.status_code == 400:  # refused as malformed: fine, nothing spent
            assert_error(resp, 400, "invalid_request")
            assert len(fake.requests) == sent_before
            continue
        assert resp.status_code == 200, resp.text
        sent = fake.requests[-1]["body"]
        assert generated_at_most(sent) <= reserved, sent  # what the reservation covers (the allowance: 4096)


@pytest.mark.usefixtures("provider")
async def test_best_of_on_completions_counts_every_completion_generated(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str],  # noqa: F811
) -> None:
    """OpenAI's Completions generates (and bills) ``best_of`` completions server-side: the reservation covers
    them all, so a tight tokens-per-minute window clamps each one."""
    fake, _ = upstream
    limit = 200
    profile = await make_profile(client, admin, "tight", tokens_per_minute=limit)
    _key, secret = await create_key(client, admin, limit_profile=profile)
    raw = b'{"model":"metered-model","prompt":"hi","max_tokens":100,"best_of":4}'
    resp = await client.post("/v1/completions", content=raw,
                             headers={**bearer(secret), "content-type": "application/json"})
    if resp.status_code == 429:
        return
    assert resp.status_code == 200, resp.text
    sent = fake.requests[-1]["body"]
    prompt = -(-len(raw) // 3)
    assert prompt + generated_at_most(sent) <= limit, sent


@pytest.mark.usefixtures("provider")
async def test_best_of_without_a_bound_is_reserved_for_every_answer(
    client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str],  # noqa: F811
) -> None:
    """The default allowance per answer, times ``best_of``, is what a request naming no bound reserves: on a
    key's first request (the rule seeds its windows) and on the next (its plan: budget.Plan), a window with
    room for one whole allowance but not four clamps each answer."""
    fake, _ = upstream
    limit = 10_000
    profile = await make_profile(client, admin, "ten-thousand", tokens_per_minute=limit)
    _key, secret = await create_key(client, admin, limit_profile=profile)
    for _ in range(2):
        resp = await client.post("/v1/completions", json={"model": "metered-model", "prompt": "hi", "best_of": 4},
                                 headers=bearer(secret))
        assert resp.status_code == 200, resp.text
        assert generated_at_most(fake.requests[-1]["body"]) <= limit, fake.requests[-1]["body"]


@pytest.mark.parametrize("name", ["MAX_TOKENS", "Max_Tokens", "max_completion_TOKENS", "N", "Best_Of",
                                  "max_to\u212aens", "max_token\u017f"])  # the Kelvin sign, the long s
@pytest.mark.usefixtures("provider")
async def test_a_bound_named_but_for_case_is_refused_on_a_budgeted_key(
    client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str],  # noqa: F811
    name: str,
) -> None:
    """Go's encoding/json (Ollama, LocalAI) reads ``MAX_TOKENS`` (or ``max_to\\u212aens``) as max_tokens and keeps
    the last: after the bound keyplane set or counted, it would generate 100,000 tokens on a budget that paid for
    fewer. Refused before anything is reserved or sent, on every budgeted request (the first and the next)."""
    fake, _ = upstream
    profile = await make_profile(client, admin, "cased", cost_per_day_usd=100.0)
    _key, secret = await create_key(client, admin, limit_profile=profile)
    ok = await client.post(CHAT, json={"model": "metered-model", "messages": MESSAGES}, headers=bearer(secret))
    assert ok.status_code == 200, ok.text
    sent_before = len(fake.requests)
    for body in ({name: 100_000}, {"max_tokens": 5, name: 100_000}):
        resp = await client.post(CHAT, json={"model": "metered-model", "messages": MESSAGES, **body},
                                 headers=bearer(secret))
        assert assert_error(resp, 400, "invalid_request")["param"] == name
    assert len(fake.requests) == sent_before


@pytest.mark.usefixtures("provider")
async def test_a_clamp_leaves_each_choice_a_token_or_refuses(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str],
    upstream: tuple[FakeUpstream, str],  # noqa: F811
) -> None:
    """Room for fewer output tokens than the request's ``n`` choices: clamped, each choice would still get one
    token (``max_tokens: 1`` times n generated against fewer reserved): refused instead, on every backend; with
    room for a token per choice it is clamped to what fits."""
    fake, _ = upstream
    prompt = {"model": "metered-model", "messages": MESSAGES}
    # a window of 120 tokens a minute: the prompt estimate (~25) leaves room for ~95 output tokens in all
    profile = await make_profile(client, admin, "choices", tokens_per_minute=120)
    _key, secret = await create_key(client, admin, limit_profile=profile)
    sent_before = len(fake.requests)
    refused = await client.post(CHAT, json={**prompt, "n": 128, "max_tokens": 50}, headers=bearer(secret))
    assert assert_error(refused, 429, "tokens_exceeded")["limit"] == "tokens_per_minute"
    assert len(fake.requests) == sent_before
    clamped = await client.post(CHAT, json={**prompt, "n": 4, "max_tokens": 50}, headers=bearer(secret))
    assert clamped.status_code == 200, clamped.text
    per_choice = fake.requests[-1]["body"]["max_tokens"]
    assert 1 <= per_choice < 50 and int(clamped.headers["x-keyplane-max-tokens-clamped"]) == per_choice
    assert await app.kp.spend.reserved(_key["id"]) == (0.0, 0.0)
