"""A fast local upstream for the gateway benchmark (raw ASGI, fixed answers): OpenAI Chat Completions,
and Anthropic Messages on ``/v1/messages`` (the documented event sequence, usage in message_start and
message_delta)."""

from __future__ import annotations

import orjson

ANSWER = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 20}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
})
CHUNKS = [b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk",
                                    "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) + b"\n\n"
          for i in range(20)]
USAGE = b"data: " + orjson.dumps({"id": "c", "choices": [],
                                   "usage": {"prompt_tokens": 12, "completion_tokens": 20}}) + b"\n\n"


MESSAGE = orjson.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-claude",
    "content": [{"type": "text", "text": "ok " * 20}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "output_tokens": 20},
})


def _event(name: str, data: dict) -> bytes:  # type: ignore[type-arg]
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


MESSAGE_EVENTS = [
    _event("message_start", {"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-claude", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1}}}),
    _event("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
    *[_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": f"w{i} "}}) for i in range(20)],
    _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
]
MESSAGE_END = (_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                           "stop_sequence": None},
                                        "usage": {"output_tokens": 20}})
               + _event("message_stop", {"type": "message_stop"}))


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    messages = scope["path"].endswith("/messages")
    if b'"stream":true' in body.replace(b" ", b""):
        if messages:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for event in MESSAGE_EVENTS:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": MESSAGE_END, "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": USAGE + b"data: [DONE]\n\n", "more_body": False})
        return
    answer = MESSAGE if messages else ANSWER
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
