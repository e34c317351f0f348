"""``keyplane serve --demo``: a built-in local echo upstream, so a newcomer can make a chat completion
through a virtual key with no provider account. It is registered as an ordinary provider and reached
over HTTP like any other, so the demo exercises the real gateway path."""

from __future__ import annotations

import time
from typing import Any

import orjson

from keyplane.gateway.asgi import Receive, Scope, Send, read_body, send_json
from keyplane.services.principal import system
from keyplane.services.schemas import ModelPrice, ProviderCreate, ProviderUpdate

DEMO_PREFIX = "/_demo/v1"
DEMO_PROVIDER = "demo"
DEMO_MODELS = [ModelPrice(name="echo-1", input_per_mtok=1.0, output_per_mtok=2.0),
               ModelPrice(name="echo-embed-1", input_per_mtok=0.1)]


def _words(text: str) -> int:
    return len(text.split())


def _prompt_text(request: dict[str, Any]) -> str:
    messages = request.get("messages")
    if isinstance(messages, list):
        parts = [m.get("content") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return " ".join(parts)
    prompt = request.get("prompt") or request.get("input") or ""
    return prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt)


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope["path"][len(DEMO_PREFIX):]
    try:
        request = orjson.loads(await read_body(receive, 1_048_576, scope) or b"{}")
    except orjson.JSONDecodeError:
        request = {}
    if scope["method"] != "POST" or not isinstance(request, dict):
        await send_json(send, 404, {"error": {"message": "the demo upstream answers POST only"}})
        return
    prompt = _prompt_text(request)
    model = request.get("model", "echo-1")
    if path == "/embeddings":
        await send_json(send, 200, {"object": "list", "model": model, "data": [
            {"object": "embedding", "index": 0, "embedding": [len(prompt) % 7 / 7, _words(prompt) % 5 / 5]}],
            "usage": {"prompt_tokens": _words(prompt), "total_tokens": _words(prompt)}})
        return
    answer = f"echo: {prompt.split(chr(10))[-1] if prompt else '(nothing)'}"
    usage = {"prompt_tokens": _words(prompt), "completion_tokens": _words(answer),
             "total_tokens": _words(prompt) + _words(answer)}
    created = int(time.time())
    if request.get("stream") is True:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for word in answer.split():
            chunk = {"id": "demo", "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word + " "}}]}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True})
        if (request.get("stream_options") or {}).get("include_usage"):
            tail = {"id": "demo", "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(tail) + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return
    if path == "/completions":
        choice: dict[str, Any] = {"index": 0, "text": answer, "finish_reason": "stop"}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
    await send_json(send, 200, {"id": "demo", "object": "chat.completion", "created": created, "model": model,
                                "choices": [choice], "usage": usage})


async def register(kp: Any) -> None:
    """Create (or re-point, if the port changed) the ``demo`` provider of the default organization."""
    from keyplane.domain.errors import KeyplaneError
    from keyplane.services.organizations import DEFAULT_ORG

    who = system(await kp.organizations.require_id(DEFAULT_ORG))
    base_url = kp.settings.base_url + DEMO_PREFIX
    try:
        current = await kp.providers.get(who, DEMO_PROVIDER)
    except KeyplaneError:
        await kp.providers.create(who, ProviderCreate(name=DEMO_PROVIDER, base_url=base_url, models=DEMO_MODELS,
                                                      timeout_seconds=10))
        return
    if current["base_url"] != base_url:
        await kp.providers.update(who, DEMO_PROVIDER, ProviderUpdate(base_url=base_url))
