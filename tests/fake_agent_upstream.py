"""A local upstream speaking Anthropic's Messages API and OpenAI's Responses API as their docs describe them.

Streams follow the documented event sequences (Anthropic: message_start, content_block_start/delta/stop,
ping, message_delta with the final usage, message_stop; OpenAI Responses: response.created …
response.completed with usage), errors use each provider's own error body. Runs in a thread of its own,
so one server serves a whole test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.processes import free_port

# Anthropic: input_tokens excludes the cache; the cache fields are billed at their own prices.
MESSAGE_USAGE = {"input_tokens": 21, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000,
                 "output_tokens": 9}
# OpenAI Responses: input_tokens includes the cached ones.
RESPONSE_USAGE = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 30}, "output_tokens": 12,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 52}
TOOL_INPUT = {"city": "Paris", "units": ["celsius"]}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class FakeAgentUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled = threading.Event()
        self.stored: dict[str, dict[str, Any]] = {}
        self.app = Starlette(routes=[
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/responses/{response_id}", self.get_response, methods=["GET"]),
        ])

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json() if request.method == "POST" else {}
        self.requests.append({"path": request.url.path, "query": request.url.query,
                              "headers": dict(request.headers), "body": body})
        return body

    # -- Anthropic ----------------------------------------------------------------------------------

    @staticmethod
    def _anthropic_error(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)

    async def messages(self, request: Request) -> Response:
        body = await self._record(request)
        if "x-api-key" not in request.headers or "anthropic-version" not in request.headers:
            return self._anthropic_error(401, "authentication_error", "x-api-key and anthropic-version required")
        model = body.get("model")
        if model == "claude-overloaded":
            return self._anthropic_error(529, "overloaded_error",
                                         f"Overloaded (key {request.headers['x-api-key']})")
        message_id = f"msg_{len(self.requests):04d}"
        content = [{"type": "text", "text": "Checking the weather."},
                   {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": TOOL_INPUT}]
        if body.get("stream"):
            return StreamingResponse(self._message_events(message_id, model, content),
                                     media_type="text/event-stream")
        return JSONResponse({"id": message_id, "type": "message", "role": "assistant", "model": model,
                             "content": content, "stop_reason": "tool_use", "stop_sequence": None,
                             "usage": MESSAGE_USAGE})

    async def _message_events(self, message_id: str, model: str, content: list[dict[str, Any]]
                              ) -> AsyncIterator[bytes]:
        forever = model == "claude-forever"
        start_usage = {**MESSAGE_USAGE, "output_tokens": 1}
        try:
            yield _sse("message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
            yield _sse("ping", {"type": "ping"})
            for i in range(1000 if forever else 2):
                piece = content[0]["text"][:9] if i == 0 else content[0]["text"][9:]
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": piece if i < 2 else "."}})
                await asyncio.sleep(0.2 if forever or i == 0 else 0.01)
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            tool = content[1]
            yield _sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}})
            raw = json.dumps(tool["input"])
            for part in (raw[:7], raw[7:]):
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                   "delta": {"type": "input_json_delta", "partial_json": part}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 1})
            yield _sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                         "usage": {"output_tokens": MESSAGE_USAGE["output_tokens"]}})
            yield _sse("message_stop", {"type": "message_stop"})
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def count_tokens(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"input_tokens": 1234})

    # -- OpenAI Responses ---------------------------------------------------------------------------

    def _response(self, response_id: str, model: str, status: str, usage: dict[str, Any] | None,
                  output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
                "model": model, "output": output, "usage": usage, "error": None, "incomplete_details": None,
                "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0,
                "tool_choice": "auto", "tools": [], "top_p": 1.0}

    async def responses(self, request: Request) -> Response:
        body = await self._record(request)
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return JSONResponse({"error": {"message": "no key", "type": "invalid_request_error"}}, status_code=401)
        model = body.get("model")
        response_id = f"resp_{len(self.requests):04d}"
        output = [
            {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
             "arguments": json.dumps(TOOL_INPUT), "status": "completed"},
        ]
        final = self._response(response_id, model, "completed", RESPONSE_USAGE, output)
        if body.get("store", True):
            self.stored[response_id] = final
        if body.get("stream"):
            return StreamingResponse(self._response_events(final), media_type="text/event-stream")
        return JSONResponse(final)

    async def _response_events(self, final: dict[str, Any]) -> AsyncIterator[bytes]:
        seq = iter(range(1000))
        pending = {**final, "status": "in_progress", "output": [], "usage": None}
        yield _sse("response.created", {"type": "response.created", "sequence_number": next(seq),
                                        "response": pending})
        yield _sse("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                            "response": pending})
        message = final["output"][0]
        yield _sse("response.output_item.added", {
            "type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []}})
        yield _sse("response.content_part.added", {
            "type": "response.content_part.added", "sequence_number": next(seq), "item_id": message["id"],
            "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
        for piece in ("Hello", " there"):
            yield _sse("response.output_text.delta", {
                "type": "response.output_text.delta", "sequence_number": next(seq), "item_id": message["id"],
                "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []})
            await asyncio.sleep(0.01)
        yield _sse("response.output_text.done", {
            "type": "response.output_text.done", "sequence_number": next(seq), "item_id": message["id"],
            "output_index": 0, "content_index": 0, "text": "Hello there", "logprobs": []})
        yield _sse("response.content_part.done", {
            "type": "response.content_part.done", "sequence_number": next(seq), "item_id": message["id"],
            "output_index": 0, "content_index": 0, "part": message["content"][0]})
        yield _sse("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                                 "output_index": 0, "item": message})
        call = final["output"][1]
        yield _sse("response.output_item.added", {"type": "response.output_item.added",
                                                  "sequence_number": next(seq), "output_index": 1,
                                                  "item": {**call, "arguments": "", "status": "in_progress"}})
        yield _sse("response.function_call_arguments.delta", {
            "type": "response.function_call_arguments.delta", "sequence_number": next(seq), "item_id": call["id"],
            "output_index": 1, "delta": call["arguments"]})
        yield _sse("response.function_call_arguments.done", {
            "type": "response.function_call_arguments.done", "sequence_number": next(seq), "item_id": call["id"],
            "output_index": 1, "arguments": call["arguments"], "name": call["name"]})
        yield _sse("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                                 "output_index": 1, "item": call})
        yield _sse("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                          "response": final})

    async def get_response(self, request: Request) -> Response:
        await self._record(request)
        stored = self.stored.get(request.path_params["response_id"])
        if stored is None:
            return JSONResponse({"error": {"message": "not found", "type": "invalid_request_error"}}, status_code=404)
        return JSONResponse(stored)


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app on loopback from a thread with its own event loop (shared by a test module)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                                           access_log=False, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
