"""Usage read from a relayed event stream however the upstream cuts it into chunks (proxy.Upstream._stream)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from keyplane.gateway.enforce import Admission
from keyplane.gateway.proxy import Outcome, Upstream
from keyplane.gateway.wire import APIS, UsageReader
from keyplane.services.providers import Route

ROUTE = Route(provider_id="p", provider="local", base_url="http://127.0.0.1:9/v1", api_key="sk", timeout=5,
              input_per_mtok=1, output_per_mtok=2)
EVENTS = (b"data: " + orjson.dumps({"choices": [{"delta": {"content": "hi"}}]}) + b"\n\n"
          + b"data: " + orjson.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}})
          + b"\r\n\r\ndata: [DONE]\n\n")


class Answer:
    """An event-stream answer delivered in the given pieces."""

    status = 200

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    def close(self) -> None:
        pass


def cuts(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("pieces", [[EVENTS], cuts(EVENTS, 1), cuts(EVENTS, 7), cuts(EVENTS, 40),
                                    [EVENTS[:EVENTS.index(b'"usage"') + 3], EVENTS[EVENTS.index(b'"usage"') + 3:]]])
async def test_the_usage_event_is_read_however_the_stream_is_cut(pieces: list[bytes]) -> None:
    upstream = Upstream(types.SimpleNamespace(shared=None))  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    outcome = Outcome()
    key = types.SimpleNamespace(id="k")
    await upstream._stream(Answer(pieces), ROUTE, Admission(key, "127.0.0.1", []), receive, send,  # type: ignore[arg-type]
                           outcome, UsageReader(APIS["/v1/chat/completions"]), None)
    assert (outcome.input_tokens, outcome.output_tokens, outcome.stream_done) == (11, 7, True)
    assert b"".join(m.get("body", b"") for m in sent[1:]) == EVENTS and outcome.relayed_bytes == len(EVENTS)
