"""The common budgeted request, reserved without the whole rule (issue 17's speed): a request that names no
output bound, against windows with room for its whole worst case, is reserved by ``SpendLedger.reserve_whole``
through the key's ``budget.Plan``. These tests hold it to the rule: the same grant where it decides, nothing
changed where it does not, the same request sent upstream, and a limit edited applies to the next request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyplane.app import KeyplaneApp
from keyplane.domain.policy import Limits
from keyplane.runtime.spend import Grant, SpendLedger
from tests.conftest import assert_error, bearer, create_key
from tests.fake_upstream import FakeUpstream
from tests.test_budgets import (  # noqa: F401  # fixtures
    BODY,
    CHAT,
    INPUT_PER_MTOK,
    OUTPUT_PER_MTOK,
    make_profile,
    provider,
    second_instance,
    settled_usd,
    upstream,
)

UNBOUNDED = {k: v for k, v in BODY.items() if k != "max_tokens"}
ALLOWANCE = 4096  # KEYPLANE_OUTPUT_ALLOWANCE_TOKENS's default: what a request naming no bound reserves


def _optional(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | values


money = st.floats(0, 1e4, allow_nan=False, allow_infinity=False)
bucket = st.tuples(
    st.builds(Limits, tokens_per_minute=_optional(st.integers(0, 10**8)), cost_per_day_usd=_optional(money),
              budget_per_month_usd=_optional(money)),
    st.integers(0, 10**7), st.integers(0, 10**7), money, money, money,  # tokens, held tokens, day, month, held USD
    st.booleans(),  # its counters are of an earlier minute
)


def _ledger(buckets: list[tuple[Any, ...]], now: float) -> tuple[SpendLedger, tuple[tuple[str, Limits], ...]]:
    ledger = SpendLedger()
    for i, (_limits, tokens, held_tokens, day, month, held_usd, stale) in enumerate(buckets):
        ledger.seed(f"b{i}", day, month, now)
        c = ledger._buckets[f"b{i}"]
        c.tokens, c.held_tokens, c.held_usd = tokens, held_tokens, held_usd
        if stale:
            c.minute -= 1
    return ledger, tuple((f"b{i}", b[0]) for i, b in enumerate(buckets))


def _state(ledger: SpendLedger) -> list[tuple[Any, ...]]:
    return [(c.minute, c.tokens, c.held_tokens, c.day_usd, c.month_usd, c.held_usd)
            for _name, c in sorted(ledger._buckets.items())]


@settings(max_examples=400, deadline=None)
@given(st.lists(bucket, min_size=1, max_size=3), st.integers(1, 10**6), st.floats(0, 100),
       st.integers(1, 10_000_000), st.floats(0, 1000))
def test_reserve_whole_grants_what_the_rule_grants_or_leaves_it_to_the_rule(
    buckets: list[tuple[Any, ...]], ptok: int, input_per_mtok: float, wanted: int, output_per_mtok: float,
) -> None:
    now = time.time()
    if int(now) // 60 != int(now + 1) // 60:  # the rule and reserve_whole must see the same minute
        time.sleep(1)
        now = time.time()
    pusd, price = ptok * input_per_mtok / 1e6, output_per_mtok / 1e6
    fast, limited = _ledger(buckets, now)
    rule, _ = _ledger(buckets, now)
    before = _state(fast)
    chain = fast.chain(limited, tuple(name for name, _limits in limited))
    assert chain is not None
    whole = fast.reserve_whole(chain, ptok, pusd, wanted, price)
    exact = rule.reserve_worst(limited, ptok, pusd, wanted, price, True, now)
    if whole is None:
        assert _state(fast) == before  # nothing held: the rule decides
        return
    assert isinstance(exact, Grant), exact
    assert (whole.tokens, whole.usd, whole.output_tokens, whole.buckets) == (
        exact.tokens, exact.usd, exact.output_tokens, exact.buckets)
    assert whole.output_tokens == wanted and _state(fast) == _state(rule)
    fast.settle(whole, tuple(name for name, _limits in limited), 7, 0.25)  # through the chain's counters
    rule.settle(exact, tuple(name for name, _limits in limited), 7, 0.25)  # by name
    assert _state(fast) == _state(rule)


def test_reserve_whole_decides_the_common_case_and_not_a_new_minute() -> None:
    """With room everywhere it grants (else the property above could pass on a reserve_whole that never
    does); a bucket last written in an earlier minute is left to the rule, which starts the new window."""
    now = time.time()
    roomy = Limits(tokens_per_minute=10**9, cost_per_day_usd=1e6, budget_per_month_usd=1e7)
    ledger, limited = _ledger([(roomy, 0, 0, 0.0, 0.0, 0.0, False)], now)
    chain = ledger.chain(limited, ("b0",))
    assert chain is not None
    grant = ledger.reserve_whole(chain, 10, 1e-5, ALLOWANCE, 1e-4)
    assert grant is not None and grant.output_tokens == ALLOWANCE and ledger.reserved("b0")[0] == 10 + ALLOWANCE
    ledger._buckets["b0"].minute -= 1
    assert ledger.reserve_whole(chain, 10, 1e-5, ALLOWANCE, 1e-4) is None
    assert SpendLedger().chain(limited, ("b0",)) is None  # not seeded yet: the rule seeds it first


@pytest.mark.usefixtures("provider")
async def test_the_common_request_is_sent_as_the_rule_sends_it_and_follows_edited_limits(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str],
    upstream: tuple[FakeUpstream, str],  # noqa: F811  # the fixture imported from test_budgets
) -> None:
    """The first request of a key seeds its windows and takes the rule; the next ones its plan. Both send the
    client's bytes with the same bound spliced in and say so in the same header. Lowering the limit (on the
    key's profile, or on its parent's for a sub-key) clamps the very next request; raising it lifts the clamp."""
    fake, _ = upstream
    profile = await make_profile(client, admin, "roomy", cost_per_day_usd=10.0)
    key, secret = await create_key(client, admin, limit_profile=profile)
    sub = (await client.post(f"/api/v1/keys/{key['id']}/subkeys", json={"name": "sub"}, headers=admin)).json()
    raw = b'{"model": "metered-model", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {**bearer(secret), "content-type": "application/json"}

    async def bound(headers: dict[str, str]) -> int:
        resp = await client.post(CHAT, content=raw, headers=headers)
        assert resp.status_code == 200, resp.text
        sent = fake.requests[-1]
        assert sent["raw"] == b'{"max_tokens":%d,' % sent["body"]["max_tokens"] + raw[1:]
        assert resp.headers["x-keyplane-max-tokens-clamped"] == str(sent["body"]["max_tokens"])
        return int(sent["body"]["max_tokens"])

    sub_headers = {**bearer(sub["secret"]), "content-type": "application/json"}
    assert [await bound(headers) for _ in range(3)] + [await bound(sub_headers)] == [ALLOWANCE] * 4
    spent = await settled_usd(app, client, admin, key["id"]) + await settled_usd(app, client, admin, sub["key"]["id"])
    # What is left, less a prompt, pays for fewer output tokens than the allowance: the next request is clamped
    # to it (the fake generates all of it), and then the window has less than one token's price left.
    patched = await client.patch(f"/api/v1/limit-profiles/{profile}", json={"cost_per_day_usd": spent + 0.3},
                                 headers=admin)
    assert patched.status_code == 200, patched.text
    assert 2_000 < await bound(headers) < 3_000  # ~$0.3 at $100 per million output tokens, less the prompt
    refused = await client.post(CHAT, content=raw, headers=sub_headers)  # the parent's window binds its sub-key
    assert assert_error(refused, 429, "budget_exceeded")["limit"] == "cost_per_day_usd"
    patched = await client.patch(f"/api/v1/limit-profiles/{profile}", json={"cost_per_day_usd": 10.0}, headers=admin)
    assert patched.status_code == 200, patched.text
    assert [await bound(headers), await bound(sub_headers)] == [ALLOWANCE] * 2
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)


@pytest.mark.usefixtures("provider")
async def test_requests_naming_no_bound_under_concurrency_never_overspend(
    app: KeyplaneApp, settings_factory: Any, backend: str, client: httpx.AsyncClient, admin: dict[str, str],
) -> None:
    """100 requests at once that name no bound, against room for five and a half whole worst cases: those that
    fit whole are reserved whole (the plan, in embedded mode), the next is clamped to what is left, the rest
    refused; settled spend stays within the limit, and every reservation is settled."""
    import orjson

    prompt = -(-len(orjson.dumps(UNBOUNDED)) // 3)  # the estimate: body bytes / 3, rounded up
    worst = (prompt * INPUT_PER_MTOK + ALLOWANCE * OUTPUT_PER_MTOK) / 1e6
    limit = 5.5 * worst
    profile = await make_profile(client, admin, "five-whole", budget_per_month_usd=limit)
    key, secret = await create_key(client, admin, limit_profile=profile)
    async with second_instance(app, settings_factory, backend) as other:
        answers = await asyncio.gather(*[(client if i % 2 else other).post(CHAT, json=UNBOUNDED, headers=bearer(secret))
                                         for i in range(100)])
    served = [r for r in answers if r.status_code == 200]
    for r in answers:
        if r.status_code != 200:
            assert assert_error(r, 429, "budget_exceeded")["limit"] == "budget_per_month_usd"
    bounds = sorted(int(r.headers["x-keyplane-max-tokens-clamped"]) for r in served)
    assert bounds.count(ALLOWANCE) == 5 and len(served) >= 5, bounds  # five whole (and one clamped, mostly)
    assert await settled_usd(app, client, admin, key["id"]) <= limit + 1e-12
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)


@pytest.mark.usefixtures("provider")
async def test_a_bound_that_fits_whole_goes_as_it_came_and_embeddings_reserve_their_prompt(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str],
    upstream: tuple[FakeUpstream, str],  # noqa: F811  # the fixture imported from test_budgets
) -> None:
    """What coding agents send (a bound named on every request): reserved whole where it fits, forwarded byte
    for byte with no header; a bound past what is left is clamped by the rule; an embedding (no output bound)
    reserves its prompt and settles. Each through the plan after the key's first request."""
    fake, _ = upstream
    profile = await make_profile(client, admin, "named", cost_per_day_usd=1.0, tokens_per_minute=10**6)
    key, secret = await create_key(client, admin, limit_profile=profile)
    headers = {**bearer(secret), "content-type": "application/json"}
    raw = b'{"model":"metered-model","max_tokens":300, "messages":[{"role":"user","content":"hi"}]}'
    for _ in range(3):  # the first seeds the windows (the rule), the next two take the plan
        resp = await client.post(CHAT, content=raw, headers=headers)
        assert resp.status_code == 200, resp.text
        assert "x-keyplane-max-tokens-clamped" not in resp.headers and fake.requests[-1]["raw"] == raw
    for _ in range(2):
        emb = await client.post("/v1/embeddings", json={"model": "metered-model", "input": "x"}, headers=headers)
        assert emb.status_code == 200, emb.text
    # $1 a day at $100 per million output tokens: ~10,000 output tokens in all; 900 spent so far
    resp = await client.post(CHAT, content=raw.replace(b"300", b"50000"), headers=headers)
    clamped = int(resp.headers["x-keyplane-max-tokens-clamped"])
    assert resp.status_code == 200 and 8_000 < clamped < 9_100 and fake.requests[-1]["body"]["max_tokens"] == clamped
    assert await app.kp.spend.reserved(key["id"]) == (0.0, 0.0)
    assert await settled_usd(app, client, admin, key["id"]) <= 1.0
