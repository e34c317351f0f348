"""Forwarding to an OpenAI-compatible upstream with the provider's secret: pooled, streamed, metered."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from keyplane.domain.errors import KeyplaneError, invalid_request
from keyplane.gateway.asgi import Receive, Send, send_json
from keyplane.gateway.enforce import Admission
from keyplane.runtime.spend import Exhausted
from keyplane.services.container import Keyplane
from keyplane.services.providers import Route, secret_mask

STREAMABLE = frozenset({"/v1/chat/completions", "/v1/completions"})
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; recorded, never sent


@dataclass(slots=True)
class Outcome:
    """What one data-plane request did, for its usage event and access-log line."""

    status: int = 0
    code: str = "ok"
    provider: str | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def meter(self, route: Route, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.input_tokens = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        self.output_tokens = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        self.cost_usd = route.cost(self.input_tokens, self.output_tokens)


def spend_refusal(spent: Exhausted) -> KeyplaneError:
    retry_after = max(1, math.ceil(spent.resets_at - time.time()))
    resets_at = datetime.fromtimestamp(spent.resets_at, UTC).isoformat().replace("+00:00", "Z")
    what = "tokens this minute" if spent.is_rate else "USD"
    return KeyplaneError(
        429, "rate_limited" if spent.is_rate else "budget_exceeded",
        f"Limit {spent.limit} of {spent.value:g} {what} is spent; it resets at {resets_at}",
        headers={"Retry-After": str(retry_after)},
        extra={"limit": spent.limit, "resets_at": resets_at, "retry_after": retry_after},
    )


def upstream_message(resp_body: bytes, route: Route) -> str:
    try:
        parsed = orjson.loads(resp_body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        message = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
    except orjson.JSONDecodeError:
        message = None
    text = str(message) if message else resp_body[:500].decode("utf-8", "replace").strip() or "no message"
    if route.api_key:
        text = text.replace(route.api_key, secret_mask(route.api_key))  # never echo the provider's secret
    return text[:1000]


def _usage_from_sse(line: bytes) -> Any:
    """The ``usage`` object of one ``data: {...}`` line, if it carries one."""
    if not line.startswith(b"data:") or b'"usage"' not in line:
        return None
    try:
        event = orjson.loads(line[5:].strip())
    except orjson.JSONDecodeError:
        return None
    return event.get("usage") if isinstance(event, dict) else None


class Upstream:
    """One aiohttp session for every provider: connections are pooled, kept alive and reused.

    (httpx was measured first: its pool managed ~500 req/s under concurrency on this machine,
    aiohttp ~6,900; see docs/performance.md.)
    """

    def __init__(self, kp: Keyplane) -> None:
        self.kp = kp
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created lazily: it belongs to the running event loop
            limit = self.kp.settings.upstream_max_connections
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300), trust_env=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def route_for(self, admission: Admission, body: bytes, outcome: Outcome) -> tuple[Route, dict[str, Any]]:
        try:
            request = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise invalid_request("The request body is not valid JSON") from None
        if not isinstance(request, dict):
            raise invalid_request("The request body must be a JSON object")
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise invalid_request("'model' is required", param="model")
        outcome.model = model[:200]
        allowed = admission.key.allowed_models
        if allowed and model not in allowed:
            raise KeyplaneError(403, "model_not_allowed", f"This key may not use model '{model}'",
                                extra={"allowed_models": list(allowed)})
        route = (await self.kp.routes_for(admission.key.org_id)).get(model)
        if route is None:
            raise KeyplaneError(404, "not_found", f"No provider serves model '{model}'", extra={"param": "model"})
        outcome.provider = route.provider
        return route, request

    async def forward(self, admission: Admission, path: str, body: bytes, receive: Receive, send: Send,
                      outcome: Outcome) -> None:
        route, request = await self.route_for(admission, body, outcome)
        spent = await self.kp.check_spend(admission.key)
        if spent is not None:
            raise spend_refusal(spent)
        stream = request.get("stream") is True and path in STREAMABLE
        if stream:
            options = request.get("stream_options")
            if not isinstance(options, dict) or options.get("include_usage") is not True:
                # Usage comes from the upstream's own count: ask for it on streams.
                request["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                body = orjson.dumps(request)
        headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
        if route.api_key:
            headers["authorization"] = f"Bearer {route.api_key}"
        url = route.base_url + path[len("/v1"):]
        # The timeout bounds connecting and each wait for data, not a whole (possibly long) stream.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=route.timeout, sock_read=route.timeout)
        try:
            response = await self.session().post(url, data=body, headers=headers, timeout=timeout)
        except TimeoutError:
            raise KeyplaneError(504, "upstream_timeout",
                                f"Provider '{route.provider}' did not answer within {route.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise KeyplaneError(502, "upstream_error",
                                f"Could not reach provider '{route.provider}': {type(exc).__name__}") from None
        try:
            if response.status >= 400:
                raw = await response.read()
                raise KeyplaneError(response.status, "upstream_error",
                                    f"Provider '{route.provider}' answered {response.status}: "
                                    f"{upstream_message(raw, route)}")
            if stream:
                await self._stream(response, route, admission, receive, send, outcome)
            else:
                raw = await response.read()
                try:
                    outcome.meter(route, orjson.loads(raw).get("usage"))
                except (orjson.JSONDecodeError, AttributeError):
                    pass
                content_type = response.headers.get("content-type", "application/json").encode("latin-1")
                await send({"type": "http.response.start", "status": response.status, "headers": [
                    (b"content-type", content_type), (b"content-length", str(len(raw)).encode()),
                    *admission.headers]})
                await send({"type": "http.response.body", "body": raw})
                outcome.status = response.status
        except TimeoutError:
            raise KeyplaneError(504, "upstream_timeout", f"Provider '{route.provider}' timed out") from None
        except aiohttp.ClientError as exc:
            raise KeyplaneError(502, "upstream_error",
                                f"Provider '{route.provider}' broke the connection: {type(exc).__name__}") from None
        finally:
            response.release()

    async def _stream(self, response: aiohttp.ClientResponse, route: Route, admission: Admission,
                      receive: Receive, send: Send, outcome: Outcome) -> None:
        """Chunk by chunk, no buffering of the answer; a client that leaves cancels the upstream call."""
        await send({"type": "http.response.start", "status": response.status, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *admission.headers]})
        outcome.status = response.status

        async def pump() -> None:
            pending = b""
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    usage = _usage_from_sse(line.strip())
                    if usage:
                        outcome.meter(route, usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(client_gone())
        try:
            done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        if pumping in done:
            exc = pumping.exception()
            if exc is not None:
                # Headers are gone already: end the stream and record what happened.
                outcome.code = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
                response.close()
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            response.close()  # drop the upstream connection: the upstream sees the cancellation
            outcome.status, outcome.code = CLIENT_CLOSED, "client_disconnected"


async def send_models(kp: Keyplane, admission: Admission, send: Send) -> None:
    routes = await kp.routes_for(admission.key.org_id)
    allowed = admission.key.allowed_models
    data = [{"id": name, "object": "model", "created": 0, "owned_by": route.provider}
            for name, route in sorted(routes.items()) if not allowed or name in allowed]
    await send_json(send, 200, {"object": "list", "data": data}, admission.headers)
