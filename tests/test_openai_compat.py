"""The gateway and its demo provider as the official OpenAI SDK sees them (issue 12, item 8), and the demo
provider's lifetime (item 7)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from keyplane.app import KeyplaneApp
from keyplane.domain.errors import KeyplaneError
from keyplane.services.principal import system
from keyplane.services.schemas import KeyCreate, ModelPrice, ProviderCreate
from tests.processes import free_port, serve


@pytest.fixture
async def demo(settings_factory: Any) -> AsyncIterator[tuple[KeyplaneApp, str]]:
    port = free_port()
    application = KeyplaneApp(settings_factory(demo=True, port=port))
    await application.startup()
    try:
        async with serve(application, port) as base:
            yield application, base
    finally:
        await application.shutdown()


async def _key(app: KeyplaneApp, **fields: Any) -> str:
    assert app.bootstrap is not None
    _, secret = await app.kp.keys.create(system(app.bootstrap.org_id), KeyCreate(name="sdk", **fields))
    return secret


@pytest.fixture
async def sdk(demo: tuple[KeyplaneApp, str]) -> AsyncIterator[Any]:
    """``await sdk(**key_fields)``: an official OpenAI client holding a fresh virtual key; closed after the test."""
    app, base = demo
    made: list[openai.AsyncOpenAI] = []

    async def make(**fields: Any) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(api_key=await _key(app, **fields), base_url=base + "/v1", max_retries=0))
        return made[-1]

    yield make
    for client in made:
        await client.close()


async def test_models_retrieve_and_list(sdk: Any) -> None:
    client = await sdk()
    model = await client.models.retrieve("echo-1")
    assert (model.id, model.object, model.owned_by) == ("echo-1", "model", "demo")
    assert {m.id async for m in client.models.list()} == {"echo-1", "echo-embed-1"}
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-nothing")
    assert missing.value.body["code"] == "not_found"  # type: ignore[index]
    # A key limited to some models does not see the others, one by one either.
    narrow = await sdk(allowed_models=["echo-1"])
    assert (await narrow.models.retrieve("echo-1")).id == "echo-1"
    with pytest.raises(openai.NotFoundError):
        await narrow.models.retrieve("echo-embed-1")
    # Listing models needs models:read, one model too.
    chat_only = await sdk(scopes=["chats:create"])
    with pytest.raises(openai.PermissionDeniedError):
        await chat_only.models.retrieve("echo-1")


async def test_demo_answers_in_openai_shapes(sdk: Any) -> None:
    client = await sdk()

    # One vector per input, in order; the SDK asks for base64 by default and decodes it.
    vectors = await client.embeddings.create(model="echo-embed-1", input=["one", "two", "three"])
    assert [d.index for d in vectors.data] == [0, 1, 2]
    assert len({tuple(d.embedding) for d in vectors.data}) == 3 and all(len(d.embedding) == 8 for d in vectors.data)
    floats = await client.embeddings.create(model="echo-embed-1", input=["one", "two"], encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in vectors.data[:2]]
    single = await client.embeddings.create(model="echo-embed-1", input="one")
    assert len(single.data) == 1 and single.data[0].embedding == vectors.data[0].embedding

    completion = await client.completions.create(model="echo-1", prompt="say hi")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "echo: say hi" and completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens == 2
    several = await client.completions.create(model="echo-1", prompt=["a", "b c"])
    assert [(c.index, c.text) for c in several.choices] == [(0, "echo: a"), (1, "echo: b c")]
    streamed = [chunk async for chunk in await client.completions.create(model="echo-1", prompt="x y", stream=True)]
    assert all(c.object == "text_completion" for c in streamed)
    assert "".join(c.choices[0].text for c in streamed if c.choices).strip() == "echo: x y"

    chat = await client.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "hello"}])
    assert chat.object == "chat.completion" and chat.choices[0].message.content == "echo: hello"
    parts = [c async for c in await client.chat.completions.create(
        model="echo-1", messages=[{"role": "user", "content": "hi there"}], stream=True)]
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices).strip() == "echo: hi there"
    assert [c.choices[0].finish_reason for c in parts if c.choices][-1] == "stop"


async def test_the_demo_provider_goes_with_the_demo(settings_factory: Any) -> None:
    port = free_port()
    first = KeyplaneApp(settings_factory(demo=True, port=port))
    await first.startup()
    org = system(first.bootstrap.org_id)  # type: ignore[union-attr]
    assert (await first.kp.providers.get(org, "demo"))["name"] == "demo"
    await first.shutdown()

    again = KeyplaneApp(settings_factory(port=port))  # no --demo this time
    await again.startup()
    try:
        with pytest.raises(KeyplaneError):
            await again.kp.providers.get(org, "demo")
        assert "echo-1" not in await again.kp.routes_for(org.org_id)
        events = await again.kp.audit.list(org, action="provider.delete")
        assert events["data"] and events["data"][0]["details"]["name"] == "demo"  # removed, and audited
    finally:
        await again.shutdown()


async def test_an_upstream_error_is_typed_as_one(demo: tuple[KeyplaneApp, str], sdk: Any) -> None:
    """A provider that answers 404 (as the demo's address did once the server ran without --demo)."""
    app, base = demo
    org = system(app.bootstrap.org_id)  # type: ignore[union-attr]
    await app.kp.providers.create(org, ProviderCreate(name="lost", base_url=base + "/nothing/v1",
                                                      models=[ModelPrice(name="lost-1")]))
    client = await sdk()
    with pytest.raises(openai.NotFoundError) as refused:
        await client.chat.completions.create(model="lost-1", messages=[{"role": "user", "content": "hi"}])
    body = refused.value.body
    assert body["code"] == "upstream_error" and body["type"] == "upstream_error"  # type: ignore[index]
    assert KeyplaneError(504, "upstream_timeout", "slow").type == "upstream_error"
    assert KeyplaneError(404, "not_found", "none").type == "invalid_request_error"
