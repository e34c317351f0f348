"""Forwarding to an upstream with the provider's secret: pooled, streamed, metered.

What differs between the APIs (OpenAI-compatible or Anthropic, where usage is) is in wire.py;
this module does the same thing for all of them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from keyplane.domain.errors import KeyplaneError, invalid_request
from keyplane.domain.policy import KeySnapshot
from keyplane.gateway import budget
from keyplane.gateway.asgi import ClientLeft, Receive, Scope, Send, relay_until_client_leaves
from keyplane.gateway.enforce import Admission
from keyplane.gateway.http_client import HttpClient, HttpClientError, Prepared, Response
from keyplane.gateway.model_name import recorded_model
from keyplane.gateway.wire import ANTHROPIC, ANTHROPIC_VERSION, APIS, Api, Tokens, UsageReader
from keyplane.runtime.response_owners import ResponseOwners, SharedResponseOwners
from keyplane.runtime.spend import Ask, Exhausted, Grant
from keyplane.services.container import Keyplane
from keyplane.services.providers import Route, secret_mask

CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; recorded, never sent


@dataclass(slots=True)
class Outcome:
    """What one data-plane request did, for its usage event and access-log line."""

    status: int = 0
    code: str = "ok"
    provider: str | None = None
    model: str | None = None
    input_tokens: int = 0  # every prompt token, cached ones included (wire.Tokens)
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: float = 0.0
    settled: bool = False  # the spend is counted in the ledger already
    grant: Grant | None = None  # the reservation this request holds until it is settled
    route: Route | None = None
    streamed: bool = False  # an event stream started: the answer is (partly) generated
    stream_done: bool = False  # … and ran to its end
    relayed_bytes: int = 0

    def meter(self, route: Route, tokens: Tokens | None) -> None:
        if tokens is None:
            return
        self.input_tokens, self.output_tokens = tokens.input, tokens.output
        self.cache_write_tokens, self.cache_read_tokens = tokens.cache_write, tokens.cache_read
        self.cost_usd = route.cost(tokens.input, tokens.output, tokens.cache_write, tokens.cache_read)


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


def _read_sse_line(line: bytes, reader: UsageReader) -> bool:
    """Hand one ``data: {...}`` line to the usage reader if it can carry usage (or a response id)."""
    if not line.startswith(b"data:") or (b'"usage"' not in line and b'"response.created"' not in line):
        return False
    try:
        reader.event(orjson.loads(line[5:].strip()))
    except orjson.JSONDecodeError:
        return False
    return True


def _upstream_headers(api: Api, route: Route, scope: Scope | None, stream: bool) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
    if route.kind == ANTHROPIC:
        headers["anthropic-version"] = ANTHROPIC_VERSION
        if route.api_key:
            headers["x-api-key"] = route.api_key
    elif route.api_key:
        headers["authorization"] = f"Bearer {route.api_key}"
    if scope is not None and api.forwarded_headers:
        for name, value in scope["headers"]:
            if name in api.forwarded_headers:
                headers[name.decode("latin-1")] = value.decode("latin-1")
    return headers


def _query(scope: Scope | None) -> str:
    raw = scope.get("query_string", b"") if scope is not None else b""
    return "?" + raw.decode("latin-1") if raw else ""


def _forwarded(api: Api, scope: Scope | None) -> tuple[tuple[bytes, bytes], ...]:
    """The client's headers this API passes on (anthropic-version, anthropic-beta), as they came."""
    if scope is None or not api.forwarded_headers:
        return ()
    names = api.forwarded_headers
    return tuple([(name, value) for name, value in scope["headers"] if name in names])


def _unreachable(route: Route, exc: HttpClientError) -> KeyplaneError:
    return KeyplaneError(502, "upstream_error", f"Could not reach provider '{route.provider}': {exc}")


def _parse_request(admission: Admission, body: bytes, outcome: Outcome) -> tuple[dict[str, Any], str]:
    """The request's JSON object and the model it names, or the refusal (400, 403)."""
    try:
        request = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        raise invalid_request("The request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise invalid_request("The request body must be a JSON object")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("'model' is required", param="model")
    outcome.model = recorded_model(model)
    allowed = admission.key.allowed_models
    if allowed and model not in allowed:
        raise KeyplaneError(403, "model_not_allowed", f"This key may not use model '{model}'",
                            extra={"allowed_models": list(allowed)})
    return request, model


def _route_in(routes: dict[str, Route], model: str, outcome: Outcome, api: Api) -> Route:
    route = routes.get(model)
    if route is None:
        raise KeyplaneError(404, "not_found", f"No provider serves model '{model}'", extra={"param": "model"})
    outcome.provider = route.provider
    if route.kind != api.provider_kind:
        raise invalid_request(f"Model '{model}' is served by provider '{route.provider}' of kind '{route.kind}', "
                              f"which does not speak this API: it needs a provider of kind "
                              f"'{api.provider_kind}'", param="model")
    return route


class Upstream:
    """One pooled HTTP client for every provider: connections are kept alive and reused per upstream.

    (httpx was measured first, ~500 req/s under concurrency here; aiohttp ~6,900; the lean client in
    gateway/http_client.py spends about a quarter of aiohttp's CPU per request: see docs/performance.md.)
    """

    def __init__(self, kp: Keyplane) -> None:
        self.kp = kp
        self._client: HttpClient | None = None
        # The encoded request head per (route, path, stream, query, forwarded headers): the same bytes for
        # every request of a route but the framing (HttpClient.prepare). Holds the Route, so its id stays its.
        self._heads: dict[tuple[Any, ...], tuple[Route, Prepared]] = {}
        # A budgeted key's plan per (key, route, API) (budget.Plan): holds the snapshot and the route, so its
        # ids stay theirs; a new snapshot of the key (limits edited) or of the route (prices) gets a new plan.
        self._plans: dict[tuple[str, int, str], budget.Plan] = {}
        # Answers stored upstream that a key may read back (GET /v1/responses/{id}).
        self.stored_responses = (ResponseOwners() if kp.shared is None else SharedResponseOwners(kp.shared))

    def client(self) -> HttpClient:
        if self._client is None:
            self._client = HttpClient(max_connections=self.kp.settings.upstream_max_connections)
        return self._client

    async def close(self) -> None:
        self._heads.clear()  # prepared requests belong to the client
        self._plans.clear()  # … and plans to this process's ledger
        if self._client is not None:
            await self._client.close()
            self._client = None

    def prepared(self, method: str, api: Api, route: Route, tail: str, scope: Scope | None,
                 stream: bool) -> Prepared:
        """The upstream request's line and headers for ``route.base_url + tail``, encoded once per route
        (HttpClient.prepare): only the framing is added per request. Raises HttpClientError (a bad URL)."""
        query = scope.get("query_string", b"") if scope is not None else b""
        slot = (id(route), tail, stream, query, _forwarded(api, scope))
        held = self._heads.get(slot)
        if held is not None and held[0] is route:
            return held[1]
        prepared = self.client().prepare(method, route.base_url + tail + _query(scope),
                                         _upstream_headers(api, route, scope, stream))
        if len(self._heads) >= 1024:  # bounded: the query and the forwarded headers come from clients
            self._heads.clear()
        self._heads[slot] = (route, prepared)
        return prepared

    async def forward(self, admission: Admission, path: str, body: bytes, receive: Receive, send: Send,
                      outcome: Outcome, scope: Scope | None = None) -> None:
        api = APIS[path]
        request, model = _parse_request(admission, body, outcome)
        org_id = admission.key.org_id
        # The organization's table as Keyplane.routes_for keeps it: no coroutine once it is loaded.
        routes = self.kp.routes.get(org_id)
        if routes is None:
            routes = await self.kp.routes_for(org_id)
        route = outcome.route = _route_in(routes, model, outcome, api)
        carried = 0  # the tokens of a stored conversation the request continues: input the body does not hold
        previous = request.get("previous_response_id") if api.name == "responses" else None
        if isinstance(previous, str):  # another key's stored answer is continued no more than read back
            found = await self.stored_responses.owner_of(previous)
            if found is not None:
                if found[0] != admission.key.id:
                    raise KeyplaneError(404, "not_found", f"No stored response '{previous[:100]}' for this key",
                                        extra={"param": "previous_response_id"})
                carried = found[1]
        changed: bool | bytes = False  # True: re-encode the request; bytes: the bound's member to splice in
        key = admission.key
        if key.spend_limits and api.metered:
            variant = budget.case_variant(request)
            if variant is not None:
                raise invalid_request(f"Unknown parameter '{variant[:100]}': output bounds and choice counts are "
                                      f"named in lower case ('{variant.casefold()[:100]}')", param=variant[:100])
            # The common budgeted request first: reserved whole in a few comparisons (budget.Plan); the rest,
            # and a key's first request in this process (its windows not seeded yet), take the rule.
            plan = self._plans.get((key.id, id(route), api.name))
            if plan is None or plan.key is not key or plan.route is not route:
                plan = self._plan(key, route, api, model)
            decided = (None if plan is None or carried else
                       plan.reserve(request, len(body), outcome, admission.headers))
            if decided is not None:
                changed = decided
            else:  # the conversation carried counts as prompt (as many bytes as its tokens estimate)
                body_len = len(body)
                if carried:
                    body_len += math.ceil(carried * self.kp.settings.prompt_bytes_per_token)
                reserved = self.reserve_now(admission, api, request, body_len, route, outcome)
                if isinstance(reserved, Ask):  # a bucket's first request in this process, or the Redis mode
                    changed = await self.reserve(admission, api, request, reserved, outcome)
                else:
                    changed = reserved
        stream = request.get("stream") is True and api.streams
        if stream and api.ask_stream_usage:
            options = request.get("stream_options")
            if not isinstance(options, dict) or options.get("include_usage") is not True:
                # Usage comes from the upstream's own count: ask for it on streams.
                request["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                changed = True
        if changed is True:
            body = orjson.dumps(request)
        elif changed:  # only a bound the request did not name: spliced in, the rest as the client sent it
            body = (b"{" + changed + body[1:] if body[:1] == b"{" else  # budget.splice's usual case, without a call
                    budget.splice(body, changed) or orjson.dumps(request))
        reader = UsageReader(api)
        try:
            prepared = self.prepared("POST", api, route, path[3:], scope, stream)  # path[3:]: without "/v1"
        except HttpClientError as exc:
            raise _unreachable(route, exc) from None
        store = request.get("store") is not False

        async def before_last_byte() -> None:
            grant = outcome.grant
            if grant is not None and not outcome.input_tokens and not outcome.output_tokens:
                # Answered, and the provider reported no usage (Responses' background: true answers "queued"
                # and generates afterwards; some servers never report it): it spent what was reserved, at most.
                outcome.input_tokens, outcome.output_tokens = grant.tokens - grant.output_tokens, grant.output_tokens
                outcome.cost_usd = grant.usd
            pending = self.settle_now(admission, outcome)  # None: settled already, without an await
            if pending is not None:
                await pending
            if reader.response_id is not None and store:
                await self.stored_responses.remember(reader.response_id, admission.key.id, outcome.model or "",
                                                     outcome.input_tokens + outcome.output_tokens)

        await self._relay(prepared, body, route, admission, receive, send, outcome, reader if api.metered else None,
                          stream, before_last_byte)

    async def forward_get_response(self, admission: Admission, response_id: str, receive: Receive, send: Send,
                                   outcome: Outcome, scope: Scope | None = None) -> None:
        """``GET /v1/responses/{id}``: only an answer this key created through this gateway."""
        model = await self.stored_responses.model_for(response_id, admission.key.id)
        allowed = admission.key.allowed_models
        route = (await self.kp.routes_for(admission.key.org_id)).get(model) if model else None
        if route is None or (allowed and model not in allowed):
            raise KeyplaneError(404, "not_found", f"No stored response '{response_id[:100]}' for this key",
                                extra={"param": "response_id"})
        outcome.provider, outcome.model = route.provider, model
        url = f"{route.base_url}/responses/{response_id}{_query(scope)}"
        try:
            prepared = self.client().prepare("GET", url, _upstream_headers(APIS["/v1/responses"], route, scope, False))
        except HttpClientError as exc:
            raise _unreachable(route, exc) from None
        await self._relay(prepared, None, route, admission, receive, send, outcome, None, False, None)

    def reserve_now(self, admission: Admission, api: Api, request: dict[str, Any], body_len: int, route: Route,
                    outcome: Outcome) -> bool | bytes | Ask:
        """Reserve the request's worst case in every spend window of the key and its parents, or refuse it;
        lower its output bound to what the budget covers (gateway/budget.py). Returns what :func:`_granted`
        does (False: the request is unchanged). Without an ``await`` (no coroutine) and without an ``Ask``
        object where this process holds the windows (embedded mode, once the key's buckets are seeded); else
        nothing is reserved and the request's :class:`Ask` is returned, for :meth:`reserve`."""
        key = admission.key
        settings = self.kp.settings
        ptok, pusd, wanted, price, clamp, named, choices = budget.worst_case(
            api, request, body_len, route, key, settings.prompt_bytes_per_token, settings.output_allowance_tokens)
        if not named and not clamp and api.output_fields:
            raise budget.unbounded(api)
        ledger = self.kp.spend.sync_ledger  # LocalSpend's; SharedSpend (Redis): None
        granted = (None if ledger is None else
                   ledger.reserve_worst(key.spend_limits, ptok, pusd, wanted, price, clamp, None, True, choices))
        if granted is None:
            return Ask(ptok, pusd, wanted, price, clamp, named, choices)
        return _granted(admission, api, request, wanted, named, choices, granted, outcome)

    def _plan(self, key: KeySnapshot, route: Route, api: Api, model: str) -> budget.Plan | None:
        """The key's plan for this route and API, kept; None where the rule alone applies: the windows are in
        Redis, or a bucket's first request in this process (not seeded yet)."""
        ledger = self.kp.spend.sync_ledger  # LocalSpend's; SharedSpend (Redis): None
        if ledger is None:
            return None
        chain = ledger.chain(key.spend_limits, key.spend_buckets)
        if chain is None:
            return None
        if len(self._plans) >= 4096:  # bounded: one per key, route and API in use
            self._plans.clear()
        settings = self.kp.settings
        plan = self._plans[(key.id, id(route), api.name)] = budget.Plan(
            key, route, api, model, ledger, chain, settings.prompt_bytes_per_token, settings.output_allowance_tokens)
        return plan

    async def reserve(self, admission: Admission, api: Api, request: dict[str, Any], ask: Ask,
                      outcome: Outcome) -> bool | bytes:
        """:meth:`reserve_now` where it has to wait: the bucket's spend so far is read from the store first,
        or the windows are in Redis."""
        return _granted(admission, api, request, ask.output_tokens, ask.named, ask.choices,
                        await self.kp.reserve_spend(admission.key, ask), outcome)

    async def settle(self, admission: Admission, outcome: Outcome) -> None:
        """:meth:`settle_now`, awaiting what it returns."""
        pending = self.settle_now(admission, outcome)
        if pending is not None:
            await pending

    def settle_now(self, admission: Admission, outcome: Outcome) -> Coroutine[Any, Any, None] | None:
        """Count what an answer cost before its last byte goes out: a client that sends its next request
        as soon as this one ends (every agent loop) finds the spend already counted, also in Redis.
        The reservation is dropped at the same time; a request that failed before an answer releases it.
        A stream that ended early (the client left, the upstream broke) settles from what was generated:
        the reported usage, at least the bytes relayed as output tokens, never above the reservation; from
        the reservation itself if the provider reported nothing. Done in place where this process holds the
        windows (embedded mode: returns None); else returns the coroutine that settles, to be awaited."""
        if outcome.settled:
            return None
        tokens, cost = outcome.input_tokens + outcome.output_tokens, outcome.cost_usd
        grant = outcome.grant
        if grant is None and not (tokens or cost):
            return None
        outcome.settled = True
        if grant is not None and outcome.streamed and not outcome.stream_done:
            # The usage event records the same estimate, so a restart seeds the budget from what was counted.
            if not tokens:
                outcome.input_tokens, outcome.output_tokens = grant.tokens - grant.output_tokens, grant.output_tokens
                tokens, cost = grant.tokens, grant.usd
            elif outcome.route is not None:
                generated = math.ceil(outcome.relayed_bytes / self.kp.settings.prompt_bytes_per_token)
                outcome.output_tokens = max(outcome.output_tokens, min(generated, grant.output_tokens))
                tokens = outcome.input_tokens + outcome.output_tokens
                cost = outcome.route.cost(outcome.input_tokens, outcome.output_tokens, outcome.cache_write_tokens,
                                          outcome.cache_read_tokens)
            outcome.cost_usd = cost
        ledger = self.kp.spend.sync_ledger
        if ledger is None:  # Redis: HotPath.settle_spend, awaited by the caller
            return self.kp.settle_spend(admission.key, grant, tokens, cost)
        if grant is None:  # LocalSpend.add and LocalSpend.settle, without their coroutines
            ledger.add(admission.key.spend_buckets, tokens, cost)
        elif not grant.done:
            grant.done = True
            ledger.settle(grant, admission.key.spend_buckets, tokens, cost)
        return None

    async def _relay(self, prepared: Prepared, body: bytes | None, route: Route,
                     admission: Admission, receive: Receive, send: Send, outcome: Outcome,
                     reader: UsageReader | None, stream: bool,
                     before_last_byte: Callable[[], Awaitable[None]] | None) -> None:
        """Send the request, relay the answer. ``before_last_byte`` runs once the usage is known and before
        the client sees the answer end: what the client's next request must find done happens there."""
        # The timeout bounds connecting and each wait for data, not a whole (possibly long) stream.
        try:
            response = await self.client().send(prepared, body, connect_timeout=route.timeout,
                                                read_timeout=route.timeout)
        except TimeoutError:
            raise KeyplaneError(504, "upstream_timeout",
                                f"Provider '{route.provider}' did not answer within {route.timeout:g} s") from None
        except HttpClientError as exc:
            raise _unreachable(route, exc) from None
        try:
            if response.status >= 400:
                raw = await response.read()
                retry_after = response.headers.get("retry-after")
                raise KeyplaneError(response.status, "upstream_error",
                                    f"Provider '{route.provider}' answered {response.status}: "
                                    f"{upstream_message(raw, route)}",
                                    headers={"Retry-After": retry_after} if retry_after else None)
            if stream and (response.content_type or "").startswith("text/event-stream"):
                await self._stream(response, route, admission, receive, send, outcome, reader, before_last_byte)
            else:
                raw = await response.read()
                if reader is not None:
                    try:
                        reader.body(orjson.loads(raw))
                    except orjson.JSONDecodeError:
                        pass
                    outcome.meter(route, reader.tokens())
                if before_last_byte is not None:
                    await before_last_byte()
                content_type = response.content_type
                await send({"type": "http.response.start", "status": response.status, "headers": [
                    (b"content-type", b"application/json" if content_type is None else content_type.encode("latin-1")),
                    (b"content-length", b"%d" % len(raw)), *admission.headers]})
                await send({"type": "http.response.body", "body": raw})
                outcome.status = response.status
        except TimeoutError:
            raise KeyplaneError(504, "upstream_timeout", f"Provider '{route.provider}' timed out") from None
        except HttpClientError as exc:
            raise KeyplaneError(502, "upstream_error",
                                f"Provider '{route.provider}' broke the connection: {exc}") from None
        finally:
            response.release()

    async def _stream(self, response: Response, route: Route, admission: Admission,
                      receive: Receive, send: Send, outcome: Outcome, reader: UsageReader | None,
                      before_last_byte: Callable[[], Awaitable[None]] | None) -> None:
        """Chunk by chunk, no buffering of the answer; a client that leaves cancels the upstream call."""
        await send({"type": "http.response.start", "status": response.status, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *admission.headers]})
        outcome.status = response.status
        outcome.streamed = True

        async def pump() -> None:
            pending = b""
            async for chunk in response.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                outcome.relayed_bytes += len(chunk)
                if reader is None:
                    continue
                end = chunk.rfind(b"\n")
                if end < 0:
                    pending += chunk
                    continue
                lines, pending = pending + chunk[:end], chunk[end + 1:]  # the complete lines, the rest
                # most events carry no usage: one scan of their lines in C, not a call per line
                if (b'"usage"' in lines or b'"response.created"' in lines) and any(
                        [_read_sse_line(line.strip(), reader) for line in lines.split(b"\n")]):
                    outcome.meter(route, reader.tokens())
            outcome.stream_done = True
            if before_last_byte is not None:
                await before_last_byte()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await relay_until_client_leaves(pump(), receive)
        except ClientLeft:
            response.close()  # drop the upstream connection: the upstream sees the cancellation
            outcome.status, outcome.code = CLIENT_CLOSED, "client_disconnected"
        except Exception as exc:
            # Headers are gone already: end the stream and record what happened.
            outcome.code = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
            response.close()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def _granted(admission: Admission, api: Api, request: dict[str, Any], wanted: int, named: int, choices: int,
             granted: Grant | Exhausted, outcome: Outcome) -> bool | bytes:
    """The reservation's answer: refuse the request, or hold the grant and write the granted output bound
    into the request when it differs from what the request names (the answer says so in a header).
    ``wanted``, ``named``, ``choices``: the request's worst case (budget.worst_case). False: the request is
    unchanged; True: it changed (re-encode it); bytes: only a bound it did not name was set, this JSON member
    (budget.apply_allowance), to splice into the body as sent."""
    if type(granted) is Exhausted:
        raise budget.refusal(granted)
    outcome.grant = granted  # type: ignore[assignment]  # a Grant
    if not api.output_fields or (named and granted.output_tokens >= wanted
                                 and not budget.odd_bound(api.output_fields, request)):
        return False
    bound, member = budget.apply_allowance(api, request, granted.output_tokens, named, choices)
    # a fresh list per request (enforce.Admission): appended to in place
    admission.headers.append((budget.CLAMPED_HEADER, budget.DIGITS.get(bound) or budget.digits(bound)))
    return member or True
