"""Budgets under concurrency (issue 17): reserve before forwarding, settle after, never overspend.

Against a slow upstream that honours max_tokens (tests/fake_upstream.py, "metered-model"), on every backend;
the distributed one runs two keyplane instances sharing PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keyplane.app import KeyplaneApp
from keyplane.domain.policy import Limits
from keyplane.runtime.spend import Ask, Grant
from tests.conftest import assert_error, bearer, create_key
from tests.fake_upstream import FakeUpstream
from tests.processes import serve

CHAT = "/v1/chat/completions"
INPUT_PER_MTOK = 1.0
OUTPUT_PER_MTOK = 100.0
MAX_TOKENS = 100
BODY = {"model": "metered-model", "messages": [{"role": "user", "content": "count to a hundred"}],
        "max_tokens": MAX_TOKENS}


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    async with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
async def provider(client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str]) -> None:
    body = {"name": "local", "base_url": f"{upstream[1]}/v1", "api_key": "sk-x", "timeout_seconds": 5,
            "models": [{"name": "metered-model", "input_per_mtok": INPUT_PER_MTOK, "output_per_mtok": OUTPUT_PER_MTOK},
                       {"name": "forever-model", "input_per_mtok": INPUT_PER_MTOK,
                        "output_per_mtok": OUTPUT_PER_MTOK}]}
    resp = await client.post("/api/v1/providers", json=body, headers=admin)
    assert resp.status_code == 201, resp.text


def one_request_usd(body: dict[str, Any] = BODY) -> float:
    """What the fake bills for ``body``: one prompt token per 4 bytes, max_tokens of output."""
    import orjson

    prompt = len(orjson.dumps(body)) // 4
    return (prompt * INPUT_PER_MTOK + body["max_tokens"] * OUTPUT_PER_MTOK) / 1e6


async def make_profile(client: httpx.AsyncClient, admin: dict[str, str], name: str, **fields: Any) -> str:
    resp = await client.post("/api/v1/limit-profiles", json={"name": name, **fields}, headers=admin)
    assert resp.status_code == 201, resp.text
    return name


async def settled_usd(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], key_id: str) -> float:
    await app.kp.flush_usage()
    resp = await client.get("/api/v1/usage/events", params={"limit": 200, "key_id": key_id}, headers=admin)
    assert resp.status_code == 200, resp.text
    return sum(e["cost_usd"] for e in resp.json()["data"])


@contextlib.asynccontextmanager
async def second_instance(app: KeyplaneApp, settings_factory: Any, backend: str) -> AsyncIterator[httpx.AsyncClient]:
    """Another keyplane on the same store (and Redis, in the distributed mode); the same one otherwise."""
    if backend != "distributed":
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 2)),
                                     base_url="http://t") as same:
            yield same
        return
    other = KeyplaneApp(settings_factory())
    await other.startup()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other, client=("127.0.0.1", 2)),
                                     base_url="http://t") as c:
            yield c
    finally:
        await other.shutdown()


async def test_200_concurrent_requests_never_overspend_a_budget(
    app: KeyplaneApp, settings_factory: Any, backend: str, client: httpx.AsyncClient, admin: dict[str, str],
    provider: None,
) -> None:
    cost = one_request_usd()
    limit = 5 * cost
    profile = await make_profile(client, admin, "five", budget_per_month_usd=limit)
    key, secret = await create_key(client, admin, limit_profile=profile)
    async with second_instance(app, settings_factory, backend) as other:
        sends = [(client if i % 2 else other).post(CHAT, json=BODY, headers=bearer(secret)) for i in range(200)]
        answers = await asyncio.gather(*sends)
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    for r in refused:
        err = assert_error(r, 429, "budget_exceeded")
        assert err["limit"] == "budget_per_month_usd" and err["remaining"] < cost and err["resets_at"]
    spent = await settled_usd(app, client, admin, key["id"])
    assert spent <= limit + 1e-12  # prompt estimate (bytes / 3) over-estimates this fake's bytes / 4
    assert len(served) >= limit // cost - 1, len(served)
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)  # every reservation settled


async def test_tokens_per_minute_under_concurrency_and_sub_keys_count_up_the_chain(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: None
) -> None:
    tokens = MAX_TOKENS + 40  # one request's output plus (estimated) prompt, roughly
    profile = await make_profile(client, admin, "tpm", tokens_per_minute=4 * tokens)
    parent, _ = await create_key(client, admin, limit_profile=profile)
    subs = [(await client.post(f"/api/v1/keys/{parent['id']}/subkeys", json={"name": f"s{i}"}, headers=admin)).json()
            for i in range(2)]
    answers = await asyncio.gather(*[client.post(CHAT, json=BODY, headers=bearer(subs[i % 2]["secret"]))
                                     for i in range(40)])
    served = [r for r in answers if r.status_code == 200]
    for r in answers:
        if r.status_code != 200:
            assert assert_error(r, 429, "tokens_exceeded")["limit"] == "tokens_per_minute"
    assert len(served) >= 3
    await app.kp.flush_usage()
    events = (await client.get("/api/v1/usage/events", params={"limit": 100}, headers=admin)).json()["data"]
    used = sum(e["input_tokens"] + e["output_tokens"] for e in events if e["status"] == 200)
    assert used <= 4 * tokens
    assert {e["key_id"] for e in events if e["status"] == 200} <= {s["key"]["id"] for s in subs}
    assert await app.kp.spend.reserved(parent["id"]) == (0.0, 0.0)


async def test_output_is_clamped_to_what_the_budget_covers(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: None,
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, _ = upstream
    limit = 3 * one_request_usd()
    profile = await make_profile(client, admin, "clamping", cost_per_day_usd=limit)
    key, secret = await create_key(client, admin, limit_profile=profile)
    unbounded = {k: v for k, v in BODY.items() if k != "max_tokens"}
    first = await client.post(CHAT, json=unbounded, headers=bearer(secret))
    assert first.status_code == 200, first.text
    bound = fake.requests[-1]["body"]["max_tokens"]
    # What $limit pays for after the prompt estimate: about 3 x 100 tokens, not the fake's default 1000.
    assert 250 <= bound <= 300 and first.headers["x-keyplane-max-tokens-clamped"] == str(bound)
    assert await settled_usd(app, client, admin, key["id"]) <= limit
    _, fresh = await create_key(client, admin, limit_profile=profile)
    named = await client.post(CHAT, json=BODY, headers=bearer(fresh))  # fits: sent as it was
    assert named.status_code == 200 and "x-keyplane-max-tokens-clamped" not in named.headers
    assert fake.requests[-1]["body"]["max_tokens"] == MAX_TOKENS
    too_long = await client.post(CHAT, json={**BODY, "max_tokens": 100_000}, headers=bearer(fresh))
    assert too_long.status_code == 200 and 150 <= fake.requests[-1]["body"]["max_tokens"] <= 200


async def test_a_bound_the_request_did_not_name_is_spliced_into_the_body_as_sent(
    client: httpx.AsyncClient, admin: dict[str, str], provider: None, upstream: tuple[FakeUpstream, str]
) -> None:
    """Naming no bound, the upstream gets the client's bytes with ``"max_tokens":N,`` after the opening brace
    (no re-encoding of the whole request); where the field is there as null, or a stream asks for usage too,
    the request is re-encoded. Every time the upstream reads valid JSON with the bound in it."""
    fake, _ = upstream
    profile = await make_profile(client, admin, "splicing", cost_per_day_usd=10.0)  # the default allowance fits
    _, secret = await create_key(client, admin, limit_profile=profile)
    headers = {**bearer(secret), "content-type": "application/json"}
    unbounded = {k: v for k, v in BODY.items() if k != "max_tokens"}
    for lead in (b"", b" \r\n\t"):
        raw = lead + json.dumps(unbounded, indent=2).encode()  # spaces and newlines, as a client wrote them
        resp = await client.post(CHAT, content=raw, headers=headers)
        assert resp.status_code == 200, resp.text
        bound = int(resp.headers["x-keyplane-max-tokens-clamped"])
        sent = fake.requests[-1]
        assert sent["body"] == {**unbounded, "max_tokens": bound}
        assert sent["raw"] == lead + b'{"max_tokens":%d,' % bound + raw[len(lead) + 1:]
    for body, extra in (({**unbounded, "max_tokens": None}, {}),  # a member spliced first would lose to the null
                        ({**unbounded, "stream": True}, {"stream_options": {"include_usage": True}})):
        resp = await client.post(CHAT, json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        bound = int(resp.headers["x-keyplane-max-tokens-clamped"])
        assert bound > 0 and fake.requests[-1]["body"] == {**body, **extra, "max_tokens": bound}


async def test_clamping_lowers_the_field_the_model_accepts(
    client: httpx.AsyncClient, admin: dict[str, str], upstream: tuple[FakeUpstream, str]
) -> None:
    """OpenAI's reasoning models refuse max_tokens (the fake does too): a clamp must not add it to their
    requests. A named max_completion_tokens is lowered; naming none, the model family decides."""
    fake, url = upstream
    models = ["o3-mini", "o1", "gpt-5-mini", "gpt-4o-mini"]
    body = {"name": "families", "base_url": f"{url}/v1", "api_key": "sk-x",
            "models": [{"name": m, "input_per_mtok": 1.0, "output_per_mtok": 100.0} for m in models]}
    assert (await client.post("/api/v1/providers", json=body, headers=admin)).status_code == 201
    profile = await make_profile(client, admin, "families", cost_per_day_usd=0.01)  # 100 output tokens, less the prompt
    _, secret = await create_key(client, admin, limit_profile=profile)
    messages = [{"role": "user", "content": "hi"}]
    for model, named, field in (("o3-mini", {}, "max_completion_tokens"), ("o1", {}, "max_completion_tokens"),
                                ("gpt-5-mini", {"max_completion_tokens": 5000}, "max_completion_tokens"),
                                ("gpt-4o-mini", {"max_completion_tokens": 5000}, "max_completion_tokens"),
                                ("gpt-4o-mini", {}, "max_tokens")):
        resp = await client.post(CHAT, json={"model": model, "messages": messages, **named}, headers=bearer(secret))
        assert resp.status_code == 200, (model, resp.text)
        sent = fake.requests[-1]["body"]
        other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
        assert other not in sent, (model, sent)
        assert 50 <= sent[field] < 100 and resp.headers["x-keyplane-max-tokens-clamped"] == str(sent[field])


async def test_clamping_can_be_turned_off_then_requests_are_refused(
    client: httpx.AsyncClient, admin: dict[str, str], provider: None, upstream: tuple[FakeUpstream, str]
) -> None:
    fake, _ = upstream
    profile = await make_profile(client, admin, "strict", cost_per_day_usd=3 * one_request_usd(),
                                 clamp_output=False)
    got = (await client.get(f"/api/v1/limit-profiles/{profile}", headers=admin)).json()
    assert got.get("clamp_output", got.get("limit_profile", {}).get("clamp_output")) is False
    _, secret = await create_key(client, admin, limit_profile=profile)
    unbounded = {k: v for k, v in BODY.items() if k != "max_tokens"}
    err = assert_error(await client.post(CHAT, json=unbounded, headers=bearer(secret)), 400, "invalid_request")
    assert "max_tokens" in err["message"]
    err = assert_error(await client.post(CHAT, json={**BODY, "max_tokens": 100_000}, headers=bearer(secret)),
                       429, "budget_exceeded")
    assert err["limit"] == "cost_per_day_usd"
    sent = len(fake.requests)
    ok = await client.post(CHAT, json=BODY, headers=bearer(secret))
    assert ok.status_code == 200 and "x-keyplane-max-tokens-clamped" not in ok.headers
    assert len(fake.requests) == sent + 1 and fake.requests[-1]["body"]["max_tokens"] == MAX_TOKENS
    patched = await client.patch(f"/api/v1/limit-profiles/{profile}", json={"clamp_output": True}, headers=admin)
    assert patched.status_code == 200, patched.text
    assert (await client.post(CHAT, json=unbounded, headers=bearer(secret))).status_code == 200


async def test_a_stream_settles_from_its_final_usage(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: None
) -> None:
    profile = await make_profile(client, admin, "streaming", budget_per_month_usd=10 * one_request_usd())
    key, secret = await create_key(client, admin, limit_profile=profile)
    async with client.stream("POST", CHAT, json={**BODY, "stream": True}, headers=bearer(secret)) as resp:
        assert resp.status_code == 200
        text = "".join([chunk async for chunk in resp.aiter_text()])
    assert '"usage"' in text
    spent = await settled_usd(app, client, admin, key["id"])
    assert spent == pytest.approx(one_request_usd({**BODY, "stream": True, "stream_options": {"include_usage": True}}))
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)
    assert await _ledger_month(app, key["id"]) == pytest.approx(spent)


async def _ledger_month(app: KeyplaneApp, bucket: str) -> float:
    """What the runtime counters hold as settled this month for ``bucket`` (Redis or this process)."""
    spend: Any = app.kp.spend
    if app.kp.shared is None:
        return spend.ledger.settled(bucket)[2]

    _m, _d, month_key = spend.names.windows(bucket, bucket, time.time())
    return float(await app.kp.shared.client.get(month_key) or 0)


async def test_an_abandoned_stream_settles_from_its_reservation_when_nothing_was_reported(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: None,
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, _ = upstream
    profile = await make_profile(client, admin, "abandon", budget_per_month_usd=1.0)
    key, secret = await create_key(client, admin, limit_profile=profile)
    body = {**BODY, "model": "forever-model", "stream": True}
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as live:
        async with live.stream("POST", CHAT, json=body, headers=bearer(secret)) as resp:
            async for _chunk in resp.aiter_bytes():
                break  # the client leaves after the first chunk; the upstream never reported usage
        await asyncio.wait_for(fake.cancelled.wait(), timeout=5)
    deadline = time.monotonic() + 30
    while await app.kp.spend.reserved(key["id"]) != (0.0, 0.0):
        assert time.monotonic() < deadline, "the abandoned stream's reservation was never settled"
        await asyncio.sleep(0.05)
    worst = await settled_usd(app, client, admin, key["id"])
    # The reservation: estimated prompt (bytes / 3) at the input price plus max_tokens at the output price.
    assert worst >= MAX_TOKENS * OUTPUT_PER_MTOK / 1e6
    assert await _ledger_month(app, key["id"]) == pytest.approx(worst)


async def test_a_cancelled_request_releases_its_reservation(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], provider: None,
    upstream: tuple[FakeUpstream, str],
) -> None:
    fake, _ = upstream
    profile = await make_profile(client, admin, "cancel", budget_per_month_usd=1.5 * one_request_usd(),
                                 clamp_output=False)
    key, secret = await create_key(client, admin, limit_profile=profile)
    sent = len(fake.requests)
    fake.gate = asyncio.Event()  # the upstream holds the request until the test is done with it
    task = asyncio.ensure_future(client.post(CHAT, json=BODY, headers=bearer(secret)))
    deadline = time.monotonic() + 30
    while len(fake.requests) == sent:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        await asyncio.sleep(0.01)
    held = await app.kp.spend.reserved(key["id"])
    assert held[1] >= MAX_TOKENS * OUTPUT_PER_MTOK / 1e6  # in flight: its worst case is held
    shown = (await client.get(f"/api/v1/keys/{key['id']}/spend", headers=admin)).json()["windows"]
    month = next(w for w in shown if w["limit"] == "budget_per_month_usd")
    assert month["reserved"] == pytest.approx(held[1]) and month["settled"] == 0
    assert month["remaining"] == pytest.approx(1.5 * one_request_usd() - held[1])
    # The budget is held by the request in flight: a second one does not fit.
    assert_error(await client.post(CHAT, json=BODY, headers=bearer(secret)), 429, "budget_exceeded")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)
    fake.gate.set()
    assert (await client.post(CHAT, json=BODY, headers=bearer(secret))).status_code == 200


async def test_a_dead_process_reservations_expire(app: KeyplaneApp, backend: str, client: httpx.AsyncClient,
                                                  admin: dict[str, str], provider: None) -> None:
    if backend != "distributed":
        pytest.skip("reservations of a dead process matter across processes (Redis)")
    from keyplane.runtime.shared import SharedSpend

    profile = await make_profile(client, admin, "expiry", budget_per_month_usd=1.0)
    key, _secret = await create_key(client, admin, limit_profile=profile)
    limited = ((key["id"], Limits(budget_per_month_usd=1.0)),)
    assert app.kp.shared is not None
    dead = SharedSpend(app.kp.shared, app.kp.usage.spent_so_far, reservation_seconds=1)
    grant = await dead.reserve(limited, Ask(10, 0.0, 1000, 0.0009, True), key["id"])
    assert isinstance(grant, Grant) and grant.output_tokens == 1000
    assert (await app.kp.spend.reserved(key["id"]))[1] == pytest.approx(0.9)
    # the process "dies": never settles. Once the reservation has expired, the next one drops it.
    await asyncio.sleep(1.1)
    again = await app.kp.spend.reserve(limited, Ask(10, 0.0, 1000, 0.0009, True), key["id"])
    assert isinstance(again, Grant) and again.output_tokens == 1000, again
    assert (await app.kp.spend.reserved(key["id"]))[1] == pytest.approx(0.9)



async def test_messages_and_responses_reserve_and_clamp_the_same_way(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    from tests.fake_agent_upstream import FakeAgentUpstream, serve_in_thread

    fake = FakeAgentUpstream()
    with serve_in_thread(fake.app) as url:
        for body in ({"name": "claude", "kind": "anthropic", "base_url": f"{url}/v1", "api_key": "sk-ant-x",
                      "models": [{"name": "claude-test", "input_per_mtok": 3.0, "output_per_mtok": 15.0}]},
                     {"name": "oai", "base_url": f"{url}/v1", "api_key": "sk-x",
                      "models": [{"name": "gpt-resp", "input_per_mtok": 2.0, "output_per_mtok": 8.0},
                                 {"name": "o4-mini", "input_per_mtok": 2.0, "output_per_mtok": 8.0}]}):
            assert (await client.post("/api/v1/providers", json=body, headers=admin)).status_code == 201
        profile = await make_profile(client, admin, "agents", cost_per_day_usd=0.01)
        for path, field, body in (
            ("/v1/messages", "max_tokens", {"model": "claude-test", "max_tokens": 100_000,
                                            "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/responses", "max_output_tokens", {"model": "gpt-resp", "input": "hi"}),
            ("/v1/responses", "max_output_tokens", {"model": "o4-mini", "input": "hi"}),  # a reasoning model too
        ):
            key, secret = await create_key(client, admin, limit_profile=profile)
            resp = await client.post(path, json=body, headers={"x-api-key": secret, **bearer(secret)})
            assert resp.status_code == 200, resp.text
            bound = fake.requests[-1]["body"][field]
            bounds = {"max_tokens", "max_completion_tokens", "max_output_tokens"} & set(fake.requests[-1]["body"])
            assert bounds == {field}  # the API's own field, never another API's
            output_price = 15.0 if path == "/v1/messages" else 8.0
            assert 0.5 * 0.01 / (output_price / 1e6) < bound < 0.01 / (output_price / 1e6)
            assert resp.headers["x-keyplane-max-tokens-clamped"] == str(bound)
            assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)
            assert 0 < await settled_usd(app, client, admin, key["id"]) <= 0.01


def test_spend_key_names_of_a_family_share_one_hash_slot() -> None:
    """Every name of a key family (what the scripts are given and what they derive) hashes to one slot, whatever
    braces the namespace holds (short of ``{}``); different families spread."""
    from redis.crc import key_slot

    from keyplane.runtime.spend_keys import SpendKeys

    for namespace in ("keyplane", "team{a", "x}y"):
        names = SpendKeys(namespace + ":")
        family = [names.queue("key_root"), names.record("key_root", "p-1"),
                  names.script_prefix("key_root") + "rs:p-2"]  # how RESERVE_SCRIPT names a record it reaps
        for bucket in ("key_root", "key_child", "key_grandchild"):
            family += [*names.windows("key_root", bucket, 1_700_000_000.0), *names.reserved("key_root", bucket)]
        assert len({key_slot(name.encode()) for name in family}) == 1, namespace
    names = SpendKeys("keyplane:")
    assert len({key_slot(names.queue(f"key_{i}").encode()) for i in range(20)}) > 10


async def test_one_key_family_lives_in_one_redis_hash_slot(
    app: KeyplaneApp, backend: str, client: httpx.AsyncClient, admin: dict[str, str], provider: None
) -> None:
    """Redis Cluster runs a script only over keys of one hash slot: every name the reserve and settle scripts
    touch for a sub-key chain (its windows, its parents', the reservation record and queue, and what the
    scripts derive from those) carries the root key as hash tag."""
    if backend != "distributed":
        pytest.skip("key names in Redis")
    from redis.crc import key_slot

    shared = app.kp.shared
    assert shared is not None
    profile = await make_profile(client, admin, "slots", budget_per_month_usd=1.0, tokens_per_minute=100_000)
    root, _ = await create_key(client, admin, limit_profile=profile)
    child = (await client.post(f"/api/v1/keys/{root['id']}/subkeys", json={"name": "child", "limit_profile": profile},
                               headers=admin)).json()
    grandchild = (await client.post(f"/api/v1/keys/{child['key']['id']}/subkeys", json={"name": "grandchild"},
                                    headers=admin)).json()
    called: list[list[str]] = []
    real = {"_reserve": shared._reserve, "_settle": shared._settle}

    def recording(name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            called.append([k.decode() if isinstance(k, bytes) else k for k in kwargs["keys"]])
            return await real[name](*args, **kwargs)
        return call

    for name in real:
        setattr(shared, name, recording(name))
    try:
        for secret in (grandchild["secret"], child["secret"]):
            resp = await client.post(CHAT, json=BODY, headers=bearer(secret))
            assert resp.status_code == 200, resp.text
    finally:
        for name, script in real.items():
            setattr(shared, name, script)
    assert len(called) >= 4  # reserve (again after seeding a window) + settle, twice
    family = key_slot(root["id"].encode())
    touched = [name for keys in called for name in keys]
    assert all(f"{{{root['id']}}}" in name for name in touched), touched
    assert {key_slot(name.encode()) for name in touched} == {family}
    stored = [k.decode() async for k in shared.client.scan_iter(match=f"{shared.prefix}sp:*", count=1000)]
    assert stored and {key_slot(k.encode()) for k in stored} == {family}, stored
    # What the endpoint reads for a sub-key is what the gateway wrote (the family found by its chain).
    shown = (await client.get(f"/api/v1/keys/{grandchild['key']['id']}/spend", headers=admin)).json()["windows"]
    assert next(w for w in shown if w["limit"] == "tokens_per_minute")["settled"] > MAX_TOKENS
    shown = (await client.get(f"/api/v1/keys/{child['key']['id']}/spend", headers=admin)).json()["windows"]
    month = next(w for w in shown if w["limit"] == "budget_per_month_usd")
    assert month["settled"] == pytest.approx(2 * one_request_usd(), rel=0.05) and month["reserved"] == 0


async def test_rest_cli_and_mcp_show_settled_and_reserved_spend(
    app: KeyplaneApp, backend: str, client: httpx.AsyncClient, admin: dict[str, str], admin_token: str,
    provider: None,
) -> None:
    """Item 5 of the issue: one service (services/spend_status.py), every adapter shows the same windows."""
    import json

    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from typer.testing import CliRunner

    from keyplane.cli import app as cli_app

    profile = await make_profile(client, admin, "shown", tokens_per_minute=100_000, cost_per_day_usd=0.5,
                                 budget_per_month_usd=1.0)
    key, secret = await create_key(client, admin, limit_profile=profile)
    assert (await client.post(CHAT, json=BODY, headers=bearer(secret))).status_code == 200
    spent = await settled_usd(app, client, admin, key["id"])  # also writes the usage (the CLI reads the store)
    limited = ((key["id"], Limits(tokens_per_minute=100_000, cost_per_day_usd=0.5, budget_per_month_usd=1.0)),)
    held = await app.kp.spend.reserve(limited, Ask(10, 0.0, 1000, 0.0001, True), key["id"])  # $0.10 in flight
    assert isinstance(held, Grant)
    try:
        rest = (await client.get(f"/api/v1/keys/{key['id']}/spend", headers=admin)).json()
        month = next(w for w in rest["windows"] if w["limit"] == "budget_per_month_usd")
        assert month["settled"] == pytest.approx(spent) and month["reserved"] == pytest.approx(0.1)
        assert month["remaining"] == pytest.approx(1.0 - spent - 0.1)

        async with serve(app) as base, httpx2.AsyncClient(headers={"Authorization": f"Bearer {admin_token}"}) as h:
            async with Client(streamable_http_client(base + "/mcp", http_client=h), mode="legacy") as session:
                tool = await session.call_tool("keyplane_key_spend", {"key_id": key["id"]})
        assert not tool.is_error and tool.structured_content is not None
        assert [(w["limit"], w["settled"], w["reserved"]) for w in tool.structured_content["windows"]] == \
            [(w["limit"], w["settled"], w["reserved"]) for w in rest["windows"]]

        s = app.kp.settings
        env = {"KEYPLANE_HOME": str(s.home)}
        for name in ("database_url", "database_schema", "master_key", "redis_url", "redis_namespace"):
            if getattr(s, name):
                env[f"KEYPLANE_{name.upper()}"] = str(getattr(s, name))
        runner = CliRunner()
        as_json = await asyncio.to_thread(runner.invoke, cli_app, ["keys", "spend", key["id"], "--json"], env=env)
        assert as_json.exit_code == 0, as_json.output
        cli_month = next(w for w in json.loads(as_json.stdout)["windows"] if w["limit"] == "budget_per_month_usd")
        assert cli_month["settled"] == pytest.approx(spent)
        # Embedded: the reservation is in the server's memory, which another process cannot see (it says so).
        assert cli_month["reserved"] == pytest.approx(0.1 if backend == "distributed" else 0.0)
        table = await asyncio.to_thread(runner.invoke, cli_app, ["keys", "spend", key["id"]], env=env)
        assert table.exit_code == 0, table.output
        assert table.stdout.split()[:6] == ["LIMIT", "VALUE", "SETTLED", "RESERVED", "REMAINING", "RESETS_AT"]
        assert "budget_per_month_usd  $1.00" in table.stdout
        assert ("$0.10" in table.stdout) == (backend == "distributed")
        assert ("embedded mode" in table.stderr) == (backend != "distributed")
    finally:
        await app.kp.spend.settle(held, (key["id"],), 0, 0.0)
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)


async def test_redis_too_slow_to_answer_loses_no_spend(app: KeyplaneApp, backend: str, client: httpx.AsyncClient,
                                                       admin: dict[str, str], provider: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load Redis answers late rather than not at all: a script that ran but whose answer timed out, a
    settle that did not get through. None of that spend may go missing from the shared windows, or every
    other process would spend it again."""
    if backend != "distributed":
        pytest.skip("spend windows shared through Redis")
    from redis.exceptions import TimeoutError as RedisTimeout

    shared, spend = app.kp.shared, app.kp.spend
    assert shared is not None
    profile = await make_profile(client, admin, "slow-redis", budget_per_month_usd=1.0)
    key, _secret = await create_key(client, admin, limit_profile=profile)
    limited = ((key["id"], Limits(budget_per_month_usd=1.0)),)
    ask = Ask(10, 0.0, 1000, 0.0001, True)  # holds $0.10
    warm = await spend.reserve(limited, ask, key["id"])  # seeds the windows in Redis
    assert isinstance(warm, Grant) and not warm.local
    await spend.settle(warm, (key["id"],), 0, 0.0)
    real_reserve, real_settle = shared._reserve, shared._settle

    async def answered_late(*args: Any, **kwargs: Any) -> Any:
        await real_reserve(*args, **kwargs)
        raise RedisTimeout("Timeout reading from socket")

    # 1. The reservation ran in Redis, its answer came too late: this process falls back to its own counters.
    monkeypatch.setattr(shared, "_reserve", answered_late)
    late = await spend.reserve(limited, ask, key["id"])
    monkeypatch.setattr(shared, "_reserve", real_reserve)
    assert isinstance(late, Grant) and late.local
    await spend.settle(late, (key["id"],), 500, 0.05)  # kept: Redis failed a moment ago
    after = await spend.reserve(limited, ask, key["id"])  # … and sent before the next reservation
    assert isinstance(after, Grant) and not after.local
    await spend.settle(after, (key["id"],), 0, 0.0)
    assert await spend.reserved(key["id"]) == (0.0, 0.0)  # what the late script held is dropped
    assert await _ledger_month(app, key["id"]) == pytest.approx(0.05)  # and the answer counted in Redis

    # 2. A settle that did not get through is sent again before the next reservation, and counts once
    #    even when the first one did run (its answer lost).
    for ran_first in (False, True):
        held = await spend.reserve(limited, ask, key["id"])
        assert isinstance(held, Grant) and not held.local

        async def lost(*args: Any, ran: bool = ran_first, **kwargs: Any) -> Any:
            if ran:
                await real_settle(*args, **kwargs)
            raise RedisTimeout("Timeout reading from socket")

        monkeypatch.setattr(shared, "_settle", lost)
        await spend.settle(held, (key["id"],), 500, 0.05)
        monkeypatch.setattr(shared, "_settle", real_settle)
        again = await spend.reserve(limited, ask, key["id"])
        assert isinstance(again, Grant)
        await spend.settle(again, (key["id"],), 0, 0.0)
        assert await spend.reserved(key["id"]) == (0.0, 0.0)
    assert await _ledger_month(app, key["id"]) == pytest.approx(0.15)


def test_budget_scripts_wait_longer_for_redis_than_other_commands() -> None:
    from keyplane.runtime.shared import SharedState

    state = SharedState("redis://127.0.0.1:1/0", timeout=1.0, spend_timeout=5.0)
    assert state.client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    assert state.spend_client.connection_pool.connection_kwargs["socket_timeout"] == 5.0
    assert state._reserve.registered_client is state.spend_client
    assert state._settle.registered_client is state.spend_client
