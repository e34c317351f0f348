"""A local OpenAI-compatible upstream for gateway tests: records what it was sent, misbehaves on request."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
# "metered-model" answers slowly (so that many requests are in flight together) and as long as it may: it
# generates max_tokens (max_completion_tokens) tokens, or METERED_DEFAULT_TOKENS when the request names
# none, and counts one prompt token per METERED_PROMPT_BYTES bytes of the body it was sent.
METERED_DELAY = 0.3
METERED_DEFAULT_TOKENS = 1000
METERED_PROMPT_BYTES = 4


# Like OpenAI: Chat Completions refuses max_tokens for the reasoning models (o1, o3, o4-mini, gpt-5…).
REASONING_MODEL = re.compile(r"(o[1-9]\d*|gpt-5)([-.:_].*)?")


def output_bound(body: dict[str, Any]) -> int | None:
    bounds = [v for v in (body.get("max_tokens"), body.get("max_completion_tokens")) if isinstance(v, int)]
    return min(bounds) if bounds else None


def usage_for(body: dict[str, Any], raw_len: int) -> dict[str, int]:
    """What this fake bills: an upstream that honours max_tokens."""
    bound = output_bound(body)
    if body.get("model") == "metered-model":
        prompt, completion = max(1, raw_len // METERED_PROMPT_BYTES), bound or METERED_DEFAULT_TOKENS
    else:
        prompt, completion = USAGE["prompt_tokens"], min(USAGE["completion_tokens"], bound or 10**9)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.raw_lengths: dict[int, int] = {}  # id(body) -> bytes received
        self.cancelled = asyncio.Event()
        # When set, "metered-model" answers only once this is set: a test holds a request in flight for as
        # long as it needs (a fixed delay would end it early on a loaded machine).
        self.gate: asyncio.Event | None = None
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ])

    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        body = json.loads(raw)
        self.raw_lengths[id(body)] = len(raw)
        self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body, "raw": raw,
                              "client_port": request.client.port if request.client else None})
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._record(request)
        model = body.get("model")
        auth = request.headers.get("authorization", "")
        if model == "error-model":
            return JSONResponse({"error": {"message": f"bad request (you sent {auth})", "type": "invalid"}},
                                status_code=400)
        if model == "boom-model":
            return Response("internal upstream failure", status_code=500)
        if isinstance(model, str) and REASONING_MODEL.fullmatch(model) and "max_tokens" in body:
            return JSONResponse({"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                           "Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}},
                status_code=400)
        if model == "slow-model":
            await asyncio.sleep(5)
        usage = usage_for(body, self.raw_lengths.pop(id(body), 0))
        if body.get("stream"):
            return StreamingResponse(self._chunks(body, usage), media_type="text/event-stream")
        if model == "metered-model":
            await asyncio.sleep(METERED_DELAY)
            if self.gate is not None:
                await self.gate.wait()
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                          "finish_reason": "stop"}], "usage": usage})

    async def _chunks(self, body: dict[str, Any], usage: dict[str, int]) -> AsyncIterator[bytes]:
        forever = body.get("model") == "forever-model"
        try:
            for i in range(1000 if forever else 3):
                chunk = {"id": "c", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": f"part{i} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(0.2 if forever or i == 0 else 0.01)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def completions(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                             "choices": [{"text": "hi", "index": 0}],
                             "usage": usage_for(body, self.raw_lengths.pop(id(body), 0))})

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"object": "list", "model": body.get("model"),
                             "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                             "usage": {"prompt_tokens": 5, "total_tokens": 5}})
