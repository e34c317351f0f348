"""Coding agents' model traffic through virtual keys: the Anthropic Messages and OpenAI Responses APIs,
driven by the official ``anthropic`` and ``openai`` SDKs against a faithful fake upstream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from keyplane.app import KeyplaneApp
from tests.conftest import assert_error, create_key, downgrader
from tests.fake_agent_upstream import (
    MESSAGE_USAGE,
    RESPONSE_USAGE,
    TOOL_INPUT,
    FakeAgentUpstream,
    serve_in_thread,
)
from tests.processes import serve

ANTHROPIC_SECRET = "sk-ant-UPSTREAM-secret-0123456789abcdef"
OPENAI_SECRET = "sk-openai-UPSTREAM-secret-0123456789abcdef"
CLAUDE_PRICES = {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cache_write_per_mtok": 3.75,
                 "cache_read_per_mtok": 0.3}
RESP_PRICES = {"input_per_mtok": 2.0, "output_per_mtok": 8.0, "cache_read_per_mtok": 0.5}
# Anthropic reports the uncached input apart from the cache writes and reads.
ONE_MESSAGE_USD = (MESSAGE_USAGE["input_tokens"] * 3.0 + MESSAGE_USAGE["cache_creation_input_tokens"] * 3.75
                   + MESSAGE_USAGE["cache_read_input_tokens"] * 0.3 + MESSAGE_USAGE["output_tokens"] * 15.0) / 1e6
ONE_MESSAGE_INPUT = (MESSAGE_USAGE["input_tokens"] + MESSAGE_USAGE["cache_creation_input_tokens"]
                     + MESSAGE_USAGE["cache_read_input_tokens"])
# OpenAI's input_tokens include the cached ones.
ONE_RESPONSE_USD = ((40 - 30) * 2.0 + 30 * 0.5 + 12 * 8.0) / 1e6
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeAgentUpstream, str]]:
    fake = FakeAgentUpstream()
    with serve_in_thread(fake.app) as url:
        yield fake, url


@pytest.fixture
async def providers(client: httpx.AsyncClient, admin: dict[str, str],
                    upstream: tuple[FakeAgentUpstream, str]) -> None:
    _, url = upstream
    for body in (
        {"name": "claude", "kind": "anthropic", "base_url": f"{url}/v1", "api_key": ANTHROPIC_SECRET,
         "timeout_seconds": 5, "models": [{"name": "claude-test", **CLAUDE_PRICES}, {"name": "claude-forever"},
                                          {"name": "claude-overloaded"}]},
        {"name": "oai", "base_url": f"{url}/v1", "api_key": OPENAI_SECRET, "timeout_seconds": 5,
         "models": [{"name": "gpt-resp", **RESP_PRICES}]},
    ):
        resp = await client.post("/api/v1/providers", json=body, headers=admin)
        assert resp.status_code == 201, resp.text


@pytest.fixture
async def sdk(app: KeyplaneApp) -> AsyncIterator[Any]:
    """Makes SDK clients talking to this app over real HTTP (each SDK brings its own HTTP client)."""
    made: list[Any] = []
    async with serve(app) as url:

        def make(kind: str, **auth: str) -> Any:
            if kind == "anthropic":
                made.append(anthropic.AsyncAnthropic(base_url=url, max_retries=0, timeout=10, **auth))
            else:
                made.append(openai.AsyncOpenAI(base_url=f"{url}/v1", max_retries=0, timeout=10, **auth))
            return made[-1]

        yield make
        for sdk_client in made:
            await sdk_client.close()


async def usage_events(app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str],
                       **params: Any) -> list[dict[str, Any]]:
    await app.kp.flush_usage()
    resp = await client.get("/api/v1/usage/events", params={"limit": 200, **params}, headers=admin)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


async def test_provider_kinds_and_cache_prices(client: httpx.AsyncClient, admin: dict[str, str],
                                               providers: None) -> None:
    got = (await client.get("/api/v1/providers/claude", headers=admin)).json()["provider"]
    assert got["kind"] == "anthropic" and got["models"][0] == {"name": "claude-test", **CLAUDE_PRICES}
    assert ANTHROPIC_SECRET not in str(got)
    assert (await client.get("/api/v1/providers/oai", headers=admin)).json()["provider"]["kind"] == "openai"
    bad = {"name": "x", "base_url": "http://127.0.0.1:9/v1", "models": [{"name": "m", "cache_read_per_mtok": -1}]}
    assert_error(await client.post("/api/v1/providers", json=bad, headers=admin), 422, "invalid_request")
    assert_error(await client.post("/api/v1/providers", json={**bad, "kind": "gemini", "models": [{"name": "m"}]},
                                   headers=admin), 422, "invalid_request")


async def test_messages_through_the_anthropic_sdk(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None, sdk: Any,
    upstream: tuple[FakeAgentUpstream, str],
) -> None:
    fake, _ = upstream
    key, secret = await create_key(client, admin)
    assert {"messages:create", "responses:create"} <= set(key["scopes"])  # new keys: documented default
    by_api_key = sdk("anthropic", api_key=secret)
    message = await by_api_key.messages.create(
        model="claude-test", max_tokens=100, tools=TOOLS, messages=[{"role": "user", "content": "Weather?"}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert message.stop_reason == "tool_use"
    tool = message.content[1]
    assert tool.type == "tool_use" and tool.id == "toolu_01A" and tool.input == TOOL_INPUT
    assert message.usage.cache_read_input_tokens == MESSAGE_USAGE["cache_read_input_tokens"]
    sent = fake.requests[-1]
    assert sent["headers"]["x-api-key"] == ANTHROPIC_SECRET and "authorization" not in sent["headers"]
    assert sent["headers"]["anthropic-version"] == by_api_key.default_headers["anthropic-version"]  # passed through
    assert sent["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert secret not in str(sent) and sent["body"]["tools"] == TOOLS

    # Claude Code's ANTHROPIC_AUTH_TOKEN arrives as a bearer token; the stream is relayed event by event.
    by_bearer = sdk("anthropic", auth_token=secret)
    async with by_bearer.messages.stream(model="claude-test", max_tokens=100, tools=TOOLS,
                                         messages=[{"role": "user", "content": "Weather?"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and "message_stop" in kinds
    assert final.content[0].text == "Checking the weather." and final.content[1].input == TOOL_INPUT
    assert final.usage.output_tokens == MESSAGE_USAGE["output_tokens"]

    # The beta Messages API: its betas travel in anthropic-beta; Claude Code's /v1/messages?beta=true keeps
    # its query string upstream.
    beta = await by_api_key.beta.messages.create(model="claude-test", max_tokens=10, betas=["context-1m-2025-08-07"],
                                                 messages=[{"role": "user", "content": "hi"}])
    assert beta.content[1].input == TOOL_INPUT
    assert fake.requests[-1]["headers"]["anthropic-beta"] == "context-1m-2025-08-07"
    resp = await client.post("/v1/messages?beta=true", headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
                             json={"model": "claude-test", "max_tokens": 10, "messages": []})
    assert resp.status_code == 200 and fake.requests[-1]["query"] == "beta=true"

    counted = await by_api_key.messages.count_tokens(model="claude-test",
                                                     messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == 1234

    events = await usage_events(app, client, admin, key_id=key["id"])
    metered = [e for e in events if e["endpoint"] == "/v1/messages"]
    assert len(metered) == 4
    for event in metered:
        assert event["provider"] == "claude" and event["model"] == "claude-test" and event["status"] == 200
        assert event["cache_write_tokens"] == MESSAGE_USAGE["cache_creation_input_tokens"]
        assert event["cache_read_tokens"] == MESSAGE_USAGE["cache_read_input_tokens"]
        assert event["input_tokens"] == ONE_MESSAGE_INPUT and event["output_tokens"] == MESSAGE_USAGE["output_tokens"]
        assert event["cost_usd"] == pytest.approx(ONE_MESSAGE_USD, rel=1e-9)
    count = next(e for e in events if e["endpoint"] == "/v1/messages/count_tokens")
    assert count["cost_usd"] == 0 and count["input_tokens"] == 0 and count["status"] == 200

    resp = await client.get("/api/v1/usage/summary", params={"group_by": "endpoint"}, headers=admin)
    groups = {row["group"]: row for row in resp.json()["data"]}
    assert groups["/v1/messages"]["requests"] == 4
    assert groups["/v1/messages"]["cost_usd"] == pytest.approx(4 * ONE_MESSAGE_USD, rel=1e-9)
    assert groups["/v1/messages"]["cache_read_tokens"] == 4 * MESSAGE_USAGE["cache_read_input_tokens"]
    # The dashboard's usage page shows them by provider and by API.
    assert (await client.post("/ui/login", data={"token": admin["Authorization"][7:]})).status_code == 303
    page = (await client.get("/ui/usage")).text
    by_api = page[page.index("<caption>By API (endpoint)</caption>"):]
    assert "<td>/v1/messages</td><td>4</td>" in by_api and "<td>/v1/messages/count_tokens</td><td>1</td>" in by_api
    assert "<td>claude</td><td>5</td>" in page[page.index("<caption>By provider</caption>"):]


async def test_messages_refusals_are_the_sdks_own_exceptions(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None, sdk: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ask = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await sdk("anthropic", api_key="mcp_sk_nope").messages.create(**ask)
    assert auth.value.body["error"]["type"] == "authentication_error"
    assert auth.value.body["error"]["message"].startswith("invalid_api_key: ")
    raw = await client.post("/v1/messages", json=ask)
    assert raw.status_code == 401 and raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "authentication_error" and raw.json()["error"]["code"] == "missing_bearer"

    # A coding agent's whole conversation fits (KEYPLANE_MAX_AGENT_BODY_BYTES), where chat keeps 1 MiB.
    _, any_model = await create_key(client, admin)
    long_ask = {**ask, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    resp = await client.post("/v1/messages", json=long_ask, headers={"x-api-key": any_model})
    assert resp.status_code == 200, resp.text
    resp = await client.post("/v1/chat/completions", json=long_ask, headers={"x-api-key": any_model})
    assert_error(resp, 413, "payload_too_large")

    _, chat_only = await create_key(client, admin, scopes=["chats:create"])
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        await sdk("anthropic", api_key=chat_only).messages.create(**ask)
    assert "insufficient_scope" in str(denied.value) and denied.value.body["error"]["scope"] == "messages:create"

    _, gpt_only = await create_key(client, admin, allowed_models=["gpt-resp"])
    with pytest.raises(anthropic.PermissionDeniedError, match="model_not_allowed"):
        await sdk("anthropic", api_key=gpt_only).messages.create(**ask)
    with pytest.raises(anthropic.BadRequestError, match="kind 'openai'"):
        await sdk("anthropic", api_key=any_model).messages.create(**{**ask, "model": "gpt-resp"})

    # Upstream errors keep their status (529: overloaded) and never show the provider's secret.
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        await sdk("anthropic", api_key=any_model).messages.create(**{**ask, "model": "claude-overloaded"})
    assert overloaded.value.status_code == 529 and overloaded.value.body["error"]["type"] == "overloaded_error"
    assert ANTHROPIC_SECRET not in str(overloaded.value.body) and "sk-…cdef" in str(overloaded.value.body)
    assert ANTHROPIC_SECRET not in caplog.text

    # The budget holds exactly as on chat: the crossing request completes, the next is refused.
    resp = await client.post("/api/v1/limit-profiles", headers=admin,
                             json={"name": "agent-budget", "cost_per_day_usd": 1.5 * ONE_MESSAGE_USD})
    assert resp.status_code == 201, resp.text
    _, budgeted = await create_key(client, admin, limit_profile="agent-budget")
    agent = sdk("anthropic", api_key=budgeted)
    await agent.messages.create(**ask)
    await agent.messages.create(**ask)
    with pytest.raises(anthropic.RateLimitError) as spent:
        await agent.messages.create(**ask)
    assert spent.value.body["error"]["code"] == "budget_exceeded"
    assert spent.value.body["error"]["limit"] == "cost_per_day_usd"
    assert spent.value.response.headers["retry-after"]

    _, free = await create_key(client, admin, limit_profile="free")  # 10 requests a minute
    limited = sdk("anthropic", api_key=free)
    for _ in range(10):
        await limited.messages.count_tokens(model="claude-test", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError, match="rate_limited"):
        await limited.messages.create(**ask)


async def test_responses_through_the_openai_sdk(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None, sdk: Any,
    upstream: tuple[FakeAgentUpstream, str],
) -> None:
    fake, _ = upstream
    key, secret = await create_key(client, admin)
    codex = sdk("openai", api_key=secret)
    response = await codex.responses.create(model="gpt-resp", input="Weather in Paris?")
    assert response.output_text == "Hello there"
    call = response.output[1]
    assert call.type == "function_call" and call.arguments == '{"city": "Paris", "units": ["celsius"]}'
    sent = fake.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_SECRET}" and secret not in str(sent)

    stream = await codex.responses.create(model="gpt-resp", input="again", stream=True, store=False)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds

    again = await codex.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == "Hello there"
    assert fake.requests[-1]["path"] == f"/v1/responses/{response.id}"
    _, other = await create_key(client, admin)
    with pytest.raises(openai.NotFoundError):  # another key's stored answer stays hidden
        await sdk("openai", api_key=other).responses.retrieve(response.id)

    _, chat_only = await create_key(client, admin, scopes=["chats:create"])
    with pytest.raises(openai.PermissionDeniedError, match="responses:create"):
        await sdk("openai", api_key=chat_only).responses.create(model="gpt-resp", input="x")
    with pytest.raises(openai.BadRequestError, match="kind 'anthropic'"):
        await codex.responses.create(model="claude-test", input="x")

    events = await usage_events(app, client, admin, key_id=key["id"])
    created = [e for e in events if e["endpoint"] == "/v1/responses"]
    ok = [e for e in created if e["status"] == 200]
    assert len(ok) == 2
    for event in ok:
        assert event["input_tokens"] == RESPONSE_USAGE["input_tokens"] and event["output_tokens"] == 12
        assert event["cost_usd"] == pytest.approx(ONE_RESPONSE_USD, rel=1e-9)
        assert event["cache_read_tokens"] == 30 and event["cache_write_tokens"] == 0
    assert any(e["endpoint"] == "/v1/responses/{response_id}" and e["status"] == 200 for e in events)


async def test_leaving_a_message_stream_cancels_the_upstream(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None,
    upstream: tuple[FakeAgentUpstream, str],
) -> None:
    fake, _ = upstream
    fake.cancelled.clear()
    key, secret = await create_key(client, admin)
    body = {"model": "claude-forever", "max_tokens": 10, "stream": True, "messages": []}
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as live:
        async with live.stream("POST", "/v1/messages", json=body, headers={"x-api-key": secret}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for chunk in resp.aiter_text():
                if "content_block_delta" in chunk:
                    break
        assert await asyncio.to_thread(fake.cancelled.wait, 5)
        await asyncio.sleep(0.1)
    event = (await usage_events(app, client, admin, key_id=key["id"]))[0]
    # What the stream reported before the client left is still metered.
    assert event["code"] == "client_disconnected" and event["input_tokens"] == ONE_MESSAGE_INPUT


async def test_connect_models_setups_work_with_the_sdks(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None, sdk: Any,
) -> None:
    import tomllib

    from keyplane.mcp_server.model_connect import mint_model_key, model_traffic_instructions
    from keyplane.services.principal import system

    assert app.bootstrap is not None
    principal = system(app.bootstrap.org_id)
    key, secret, served = await mint_model_key(app.kp, principal, "claude-code", "standard")
    assert key["scopes"] == ["messages:create", "models:read"] and key["limit_profile"] == "standard"
    assert served == ["claude-forever", "claude-overloaded", "claude-test"]
    guide = model_traffic_instructions("claude-code", "http://kp.example:8080/", secret, served)
    env = next(s.text for s in guide.snippets if s.kind == "json")
    assert '"ANTHROPIC_BASE_URL": "http://kp.example:8080"' in env and f'"ANTHROPIC_AUTH_TOKEN": "{secret}"' in env
    shell = next(s.text for s in guide.snippets if s.kind == "command")
    assert "unset ANTHROPIC_API_KEY" in shell
    # What Claude Code does with that environment: the SDK at ANTHROPIC_BASE_URL with ANTHROPIC_AUTH_TOKEN.
    message = await sdk("anthropic", auth_token=secret).messages.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert message.content[1].input == TOOL_INPUT
    with pytest.raises(openai.PermissionDeniedError):  # this key is for the Messages API only
        await sdk("openai", api_key=secret).responses.create(model="gpt-resp", input="x")

    key, secret, served = await mint_model_key(app.kp, principal, "codex", "professional")
    assert key["scopes"] == ["models:read", "responses:create"] and served == ["gpt-resp"]
    guide = model_traffic_instructions("codex", "http://kp.example:8080", secret, served)
    config = tomllib.loads(next(s.text for s in guide.snippets if s.kind == "toml"))
    provider = config["model_providers"][config["model_provider"]]
    assert provider == {"name": "keyplane", "base_url": "http://kp.example:8080/v1", "env_key": "KEYPLANE_API_KEY",
                        "wire_api": "responses"}
    assert config["model"] == "gpt-resp"
    assert next(s.text for s in guide.snippets if s.kind == "command") == f"export KEYPLANE_API_KEY={secret}"
    response = await sdk("openai", api_key=secret).responses.create(model=config["model"], input="hi")
    assert response.output_text == "Hello there"
    events = await usage_events(app, client, admin, key_id=key["id"])
    assert [e["endpoint"] for e in events] == ["/v1/responses"]


@pytest.mark.fresh_store
async def test_migration_0006_backfills_cache_tokens(settings_factory: Any) -> None:
    """A store from before 0006 keeps its usage events, now with 0 cache tokens (their true value)."""
    from sqlalchemy import text

    from keyplane.store import migrate
    from keyplane.store.db import Database

    settings = settings_factory()
    settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url, settings.database_schema)
    try:
        await migrate.upgrade(db)

        async with db.write_engine.connect() as conn:
            await conn.run_sync(downgrader(db, "0003"))
            await conn.execute(text(
                "INSERT INTO usage_events (endpoint, status, code, input_tokens, output_tokens, cost_usd, latency_ms, "
                "time) VALUES ('/v1/chat/completions', 200, 'ok', 11, 7, 0.001, 1.0, CURRENT_TIMESTAMP)"))
            await conn.commit()
        await migrate.upgrade(db)
        async with db.read_engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT input_tokens, cache_write_tokens, cache_read_tokens FROM usage_events"))).one()
        assert tuple(row) == (11, 0, 0)
    finally:
        await db.dispose()


async def test_a_stored_response_is_found_by_another_process_in_distributed_mode(
    app: KeyplaneApp, settings_factory: Any, backend: str, client: httpx.AsyncClient, admin: dict[str, str],
    providers: None,
) -> None:
    _, secret = await create_key(client, admin)
    created = await client.post("/v1/responses", json={"model": "gpt-resp", "input": "hi"},
                                headers={"Authorization": f"Bearer {secret}"})
    assert created.status_code == 200, created.text
    response_id = created.json()["id"]
    other = KeyplaneApp(settings_factory())
    await other.startup()
    try:
        transport = httpx.ASGITransport(app=other, client=("127.0.0.1", 2))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as second:
            resp = await second.get(f"/v1/responses/{response_id}", headers={"Authorization": f"Bearer {secret}"})
    finally:
        await other.shutdown()
    if backend == "distributed":  # the owner is in Redis: any process serves the retrieve
        assert resp.status_code == 200 and resp.json()["id"] == response_id
    else:  # documented: one process's memory
        assert_error(resp, 404, "not_found")


async def test_cli_connect_models_mints_a_budgeted_key_that_works(
    app: KeyplaneApp, client: httpx.AsyncClient, admin: dict[str, str], providers: None,
) -> None:
    import json

    from tests.processes import cli

    settings = app.settings
    env = {"KEYPLANE_HOME": str(settings.home)}
    if not settings.is_sqlite:
        env.update(KEYPLANE_DATABASE_URL=settings.effective_database_url,
                   KEYPLANE_DATABASE_SCHEMA=settings.database_schema or "",
                   KEYPLANE_MASTER_KEY=settings.master_key or "")
    async with serve(app) as base:
        guide = json.loads((await asyncio.to_thread(
            cli, env, "connect", "claude-code", "--models", "--profile", "free", "--url", base, "--json")).stdout)
        settings_json = json.loads(next(s["text"] for s in guide["snippets"] if s["kind"] == "json"))["env"]
        assert settings_json["ANTHROPIC_BASE_URL"] == base and guide["key"]["limit_profile"] == "free"
        agent = anthropic.AsyncAnthropic(base_url=settings_json["ANTHROPIC_BASE_URL"],
                                         auth_token=settings_json["ANTHROPIC_AUTH_TOKEN"], max_retries=0)
        try:
            message = await agent.messages.create(model="claude-test", max_tokens=5,
                                                  messages=[{"role": "user", "content": "hi"}])
        finally:
            await agent.close()
        assert message.stop_reason == "tool_use"
        text = (await asyncio.to_thread(cli, env, "connect", "codex", "--models", "--profile", "standard",
                                        "--url", base)).stdout
        assert 'wire_api = "responses"' in text and f'base_url = "{base}/v1"' in text
        assert "export KEYPLANE_API_KEY=mcp_sk_" in text
        refused = await asyncio.to_thread(cli, env, "connect", "codex", "--models", check=False)
        assert refused.returncode != 0 and "--profile" in refused.stderr
        refused = await asyncio.to_thread(cli, env, "connect", "cursor", "--models", "--profile", "free", check=False)
        assert refused.returncode != 0 and "claude-code, codex" in refused.stderr
    audit = (await client.get("/api/v1/audit", params={"action": "virtual_key.create"}, headers=admin)).json()
    assert {e["details"].get("name") for e in audit["data"]} >= {"Claude Code model traffic", "Codex model traffic"}
