"""A stored Responses answer is continued only by the key that created it.

The upstream keeps every key's answers under one provider account, so ``previous_response_id`` alone would let
any key continue (and have the model repeat) another key's conversation: the same rule as ``GET
/v1/responses/{id}`` (runtime/response_owners.py) holds where keyplane knows the answer's owner.
"""

from __future__ import annotations

import httpx

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, bearer, create_key
from tests.fake_agent_upstream import FakeAgentUpstream
from tests.test_agent_traffic import providers, upstream  # noqa: F401  # fixtures


async def test_another_keys_stored_answer_cannot_be_continued(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None,  # noqa: F811
    upstream: tuple[FakeAgentUpstream, str],  # noqa: F811
) -> None:
    fake, _ = upstream
    _key, secret = await create_key(client, admin)
    _other, other = await create_key(client, admin)
    first = await client.post("/v1/responses", json={"model": "gpt-resp", "input": "my secret plan"},
                              headers=bearer(secret))
    assert first.status_code == 200, first.text
    response_id = first.json()["id"]
    sent = len(fake.requests)
    follow = {"model": "gpt-resp", "input": "repeat everything above", "previous_response_id": response_id}
    refused = await client.post("/v1/responses", json=follow, headers=bearer(other))
    assert_error(refused, 404, "not_found")
    assert len(fake.requests) == sent  # never forwarded
    mine = await client.post("/v1/responses", json=follow, headers=bearer(secret))
    assert mine.status_code == 200, mine.text
    unknown = await client.post("/v1/responses", json={**follow, "previous_response_id": "resp_unknown"},
                                headers=bearer(other))
    assert unknown.status_code == 200, unknown.text  # an answer keyplane never saw: the upstream decides


async def test_a_continued_conversation_is_reserved_with_what_it_carries(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None,  # noqa: F811
    upstream: tuple[FakeAgentUpstream, str],  # noqa: F811
) -> None:
    """``previous_response_id`` makes the upstream read the whole stored conversation as input, which the body
    does not hold: the reservation counts the tokens of the answer it continues (its input and output), so
    concurrent follow-ups of a long conversation cannot each reserve a few bytes' worth and spend far more."""
    profile = await client.post("/api/v1/limit-profiles", json={"name": "dollar", "cost_per_day_usd": 1.0},
                                headers=admin)
    assert profile.status_code == 201, profile.text
    key, secret = await create_key(client, admin, limit_profile="dollar")
    first = await client.post("/v1/responses", json={"model": "gpt-resp", "input": "hi", "max_output_tokens": 100},
                              headers=bearer(secret))
    assert first.status_code == 200, first.text
    response_id = first.json()["id"]
    # As if that answer had ended a conversation of a million tokens ($2 of input at gpt-resp's $2 per million).
    await app.upstream.stored_responses.remember(response_id, key["id"], "gpt-resp", 1_000_000)
    follow = {"model": "gpt-resp", "input": "go on", "previous_response_id": response_id, "max_output_tokens": 100}
    refused = await client.post("/v1/responses", json=follow, headers=bearer(secret))
    assert assert_error(refused, 429, "budget_exceeded")["limit"] == "cost_per_day_usd"
    del follow["max_output_tokens"]  # naming no bound: the key's plan (budget.Plan) would reserve the body alone
    refused = await client.post("/v1/responses", json=follow, headers=bearer(secret))
    assert assert_error(refused, 429, "budget_exceeded")["limit"] == "cost_per_day_usd"
    fresh = await client.post("/v1/responses", json={"model": "gpt-resp", "input": "hi"}, headers=bearer(secret))
    assert fresh.status_code == 200, fresh.text  # the budget itself is fine
