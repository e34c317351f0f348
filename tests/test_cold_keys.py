"""Cold keys in bulk: concurrent cache misses share store round trips instead of queueing one by one."""

from __future__ import annotations

import asyncio

import httpx

from keyplane.app import KeyplaneApp
from keyplane.domain import tokens
from tests.conftest import bearer, create_key


async def test_concurrent_misses_are_answered_by_a_few_batched_queries(
        app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    made = [await create_key(client, admin, name=f"cold-{i}", scopes=["models:read"]) for i in range(24)]
    parent = made[0][0]
    resp = await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": "sub"}, headers=admin)
    assert resp.status_code == 201, resp.text
    sub_id, sub_secret = resp.json()["key"]["id"], resp.json()["secret"]
    rotated, old_secret = made[1]
    resp = await client.post(f"/api/v1/keys/{rotated['id']}/rotate", json={"grace_seconds": 600}, headers=admin)
    assert resp.status_code == 200, resp.text
    unknown = [tokens.generate(tokens.VIRTUAL_KEY_PREFIX) for _ in range(8)]

    kp = app.kp
    kp.key_cache.clear()
    before = kp.key_misses.batches
    secrets_ = [s for _, s in made] + [sub_secret] + unknown
    found = await asyncio.gather(*(kp.lookup_key(s) for s in secrets_))

    # 33 different uncached keys at once: a handful of queries, not 33 in a queue.
    assert kp.key_misses.batches - before <= kp.key_misses.max_in_flight
    for (key, _), snapshot in zip(made, found[:24], strict=True):
        assert snapshot is not None and snapshot.id == key["id"]
    assert found[1] is not None and found[1].valid_until is not None  # the rotated key's old secret, in grace
    assert found[24] is not None and found[24].id == sub_id and found[24].ancestor_ids == (parent["id"],)
    assert found[25:] == [None] * 8
    # And the answers are what the data plane enforces.
    assert (await client.get("/v1/models", headers=bearer(old_secret))).status_code == 200
    assert (await client.get("/v1/models", headers=bearer(sub_secret))).status_code == 200
    assert (await client.get("/v1/models", headers=bearer(unknown[0]))).status_code == 401
