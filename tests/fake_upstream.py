"""A local OpenAI-compatible upstream for gateway tests: records what it was sent, misbehaves on request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled = asyncio.Event()
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ])

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body,
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
        if model == "slow-model":
            await asyncio.sleep(5)
        if body.get("stream"):
            return StreamingResponse(self._chunks(body), media_type="text/event-stream")
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                          "finish_reason": "stop"}], "usage": USAGE})

    async def _chunks(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        forever = body.get("model") == "forever-model"
        try:
            for i in range(1000 if forever else 3):
                chunk = {"id": "c", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": f"part{i} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(0.2 if forever or i == 0 else 0.01)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': USAGE})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def completions(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "model": body.get("model"),
                             "choices": [{"text": "hi", "index": 0}], "usage": USAGE})

    async def embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"object": "list", "model": body.get("model"),
                             "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                             "usage": {"prompt_tokens": 5, "total_tokens": 5}})
