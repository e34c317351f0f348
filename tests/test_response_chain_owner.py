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
