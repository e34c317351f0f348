"""``keyplane serve --demo``: a built-in local echo upstream, so a newcomer can make a chat completion
through a virtual key with no provider account. It is registered as an ordinary provider and reached
over HTTP like any other, so the demo exercises the real gateway path.

It answers in OpenAI's shapes (what newcomers judge the gateway by): ``chat.completion`` and its chunks,
``text_completion`` with one choice per prompt, and one embedding per input (floats, or base64 of
little-endian float32 when ``encoding_format`` is ``base64``, as the official SDK asks by default).
The provider lives only while a server runs with ``--demo``: a start without it removes it.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid
from typing import Any

import orjson

from keyplane.gateway.asgi import Receive, Scope, Send, read_body, send_json
from keyplane.services.principal import system
from keyplane.services.schemas import ModelPrice, ProviderCreate, ProviderUpdate

DEMO_PREFIX = "/_demo/v1"
DEMO_PROVIDER = "demo"
DEMO_MODELS = [ModelPrice(name="echo-1", input_per_mtok=1.0, output_per_mtok=2.0),
               ModelPrice(name="echo-embed-1", input_per_mtok=0.1)]
EMBEDDING_DIMENSIONS = 8


def _words(text: str) -> int:
    return len(text.split())


def _as_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, list):  # token ids, as the API also accepts
        return " ".join(str(t) for t in item)
    return str(item)


def _inputs(value: Any) -> list[str]:
    """A prompt or embedding input: one string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return [_as_text(v) for v in value]
    return [_as_text(value if value is not None else "")]


def _chat_text(request: dict[str, Any]) -> str:
    parts = []
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: keep the text ones
            parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return " ".join(parts)


def _echo(prompt: str) -> str:
    return f"echo: {prompt.split(chr(10))[-1] if prompt.strip() else '(nothing)'}"


def _vector(text: str) -> list[float]:
    """A deterministic unit-free vector: the same text always embeds the same, different texts differ."""
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 256 for b in digest[:EMBEDDING_DIMENSIONS]]  # exact in float32 too, so base64 loses nothing


def _embedding(text: str, encoding: str) -> list[float] | str:
    vector = _vector(text)
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope["path"][len(DEMO_PREFIX):]
    try:
        request = orjson.loads(await read_body(receive, 1_048_576, scope) or b"{}")
    except orjson.JSONDecodeError:
        request = None
    if scope["method"] != "POST" or path not in ("/chat/completions", "/completions", "/embeddings"):
        await _error(send, 404, f"The demo upstream has no {scope['method']} {path}")
        return
    if not isinstance(request, dict):
        await _error(send, 400, "The request body must be a JSON object")
        return
    model = str(request.get("model") or "echo-1")
    created = int(time.time())
    if path == "/embeddings":
        encoding = request.get("encoding_format") or "float"
        texts = _inputs(request.get("input"))
        tokens = sum(_words(t) for t in texts)
        await send_json(send, 200, {
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": _embedding(t, encoding)}
                     for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return
    if path == "/completions":
        prompts = _inputs(request.get("prompt"))
        answers = [_echo(p) for p in prompts]
        usage = _usage(sum(_words(p) for p in prompts), sum(_words(a) for a in answers))
        completion_id = f"cmpl-demo{uuid.uuid4().hex[:20]}"
        if request.get("stream") is True:
            chunks = [{"id": completion_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": i, "text": word + " ", "logprobs": None, "finish_reason": None}]}
                      for i, answer in enumerate(answers) for word in answer.split()]
            chunks += [{"id": completion_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}]}
                       for i in range(len(answers))]
            await _stream(send, chunks, request, {"id": completion_id, "object": "text_completion",
                                                  "created": created, "model": model, "choices": [],
                                                  "usage": usage})
            return
        await send_json(send, 200, {
            "id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": a, "logprobs": None, "finish_reason": "stop"}
                        for i, a in enumerate(answers)],
            "usage": usage})
        return
    prompt = _chat_text(request)
    answer = _echo(prompt)
    usage = _usage(_words(prompt), _words(answer))
    chat_id = f"chatcmpl-demo{uuid.uuid4().hex[:20]}"
    if request.get("stream") is True:
        base = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        chunks += [{**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                   for word in answer.split()]
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        await _stream(send, chunks, request, {**base, "choices": [], "usage": usage})
        return
    await send_json(send, 200, {
        "id": chat_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage})


async def _stream(send: Send, chunks: list[dict[str, Any]], request: dict[str, Any], tail: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        chunks = [*chunks, tail]
    for chunk in chunks:
        await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _error(send: Send, status: int, message: str) -> None:
    await send_json(send, status, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                             "code": None}})


async def _default_org(kp: Any) -> Any:
    from keyplane.services.organizations import DEFAULT_ORG

    return system(await kp.organizations.require_id(DEFAULT_ORG))


async def register(kp: Any) -> None:
    """Create (or re-point, if the port changed) the ``demo`` provider of the default organization."""
    from keyplane.domain.errors import KeyplaneError

    who = await _default_org(kp)
    base_url = kp.settings.base_url + DEMO_PREFIX
    try:
        current = await kp.providers.get(who, DEMO_PROVIDER)
    except KeyplaneError:
        await kp.providers.create(who, ProviderCreate(name=DEMO_PROVIDER, base_url=base_url, models=DEMO_MODELS,
                                                      timeout_seconds=10))
        return
    if current["base_url"] != base_url:
        await kp.providers.update(who, DEMO_PROVIDER, ProviderUpdate(base_url=base_url))


async def unregister(kp: Any) -> None:
    """A start without ``--demo``: remove the demo provider a ``--demo`` run left, so ``echo-1`` is not listed
    by a server that no longer answers it. A provider named ``demo`` pointing elsewhere is someone's own: kept."""
    from keyplane.domain.errors import KeyplaneError

    try:
        who = await _default_org(kp)
        current = await kp.providers.get(who, DEMO_PROVIDER)
        if current["base_url"].endswith(DEMO_PREFIX):
            await kp.providers.delete(who, DEMO_PROVIDER)
    except KeyplaneError:  # no default organization, no demo provider, or another worker removed it first
        pass
