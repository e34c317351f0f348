"""The data plane at ``/v1/*``: raw ASGI, one dict lookup to route, one enforcement pass per request."""

from __future__ import annotations

import time

from keyplane.domain.errors import KeyplaneError, not_found
from keyplane.domain.policy import KeySnapshot
from keyplane.domain.scopes import DATA_PLANE_ROUTES
from keyplane.domain.usage_row import now_us
from keyplane.gateway.asgi import BodyTooLarge, Receive, Scope, Send, read_body, send_error, send_json
from keyplane.gateway.enforce import Enforcer, Refused
from keyplane.gateway.metrics import Metrics
from keyplane.gateway.model_name import model_named
from keyplane.gateway.models import send_model, send_models
from keyplane.gateway.proxy import Outcome, Upstream
from keyplane.gateway.wire import APIS, anthropic_error_body, speaks_anthropic
from keyplane.services.container import Keyplane

MODELS_PATH = "/v1/models"
MODEL_PREFIX = "/v1/models/"
MODEL_ROUTE = "/v1/models/{model}"  # one model (client.models.retrieve): the id is the rest of the path, "/" too
STORED_RESPONSE = "/v1/responses/{response_id}"


async def send_refusal(send: Send, path: str, error: KeyplaneError,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """keyplane's error shape, or Anthropic's on the Messages routes (wire.anthropic_error_body)."""
    if not speaks_anthropic(path):
        await send_error(send, error, headers)
        return
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send_json(send, error.status, anthropic_error_body(error), extra + (headers or []))


class DataPlane:
    def __init__(self, kp: Keyplane, enforcer: Enforcer, metrics: Metrics, upstream: Upstream) -> None:
        self.kp = kp
        self.enforcer = enforcer
        self.metrics = metrics
        self.upstream = upstream
        self.max_body = kp.settings.max_body_bytes
        self.body_limits = {path: max(self.max_body, kp.settings.max_agent_body_bytes)
                            for path, api in APIS.items() if api.agent_sized}
        self.log_requests = kp.settings.access_log
        self.routes = {route: scope for route, scope in DATA_PLANE_ROUTES.items() if "{" not in route[1]}
        # (method, prefix, template, scope) for routes ending in one {parameter}
        self.templates = [(method, path[:path.index("{")], path, scope)
                          for (method, path), scope in DATA_PLANE_ROUTES.items() if "{" in path]
        self.paths = {path for _method, path in self.routes}
        self.templates_scope = {(method, template): scope for method, _prefix, template, scope in self.templates}

    def resolve(self, method: str, path: str) -> tuple[str, str | None]:
        """(the route as recorded, its required scope or None): templates are recorded, not raw paths."""
        if path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX):  # model ids may hold "/"
            return MODEL_ROUTE, self.templates_scope.get((method, MODEL_ROUTE))
        required = self.routes.get((method, path))
        if required is not None or path in self.paths:
            return path, required
        for template_method, prefix, template, scope in self.templates:
            rest = path[len(prefix):]
            if path.startswith(prefix) and rest and "/" not in rest:
                return template, scope if template_method == method else None
        return path, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        route, required_scope = self.resolve(scope["method"], path)
        outcome = Outcome()
        key: KeySnapshot | None = None
        ip = ""
        if required_scope is None:
            if route != path or path in self.paths:
                allowed = ", ".join(sorted({m for m, p in self.routes if p == route}
                                           | {m for m, _prefix, t, _s in self.templates if t == route}))
                error = KeyplaneError(405, "method_not_allowed", f"{scope['method']} is not allowed on {route}",
                                      headers={"Allow": allowed})
            else:
                error = not_found("route", path)
            await send_refusal(send, path, error)
            outcome.status, outcome.code = error.status, error.code
            self._finish(route, outcome, None, ip, started)
            return
        body = b""
        try:
            limit = self.body_limits.get(path, self.max_body)
            try:
                body = await read_body(receive, limit, scope)
            except BodyTooLarge:
                raise Refused(KeyplaneError(413, "payload_too_large",
                                            f"Request bodies are limited to {limit} bytes")) from None
            admission = await self.enforcer.admit(scope, required_scope, body)
        except Refused as refused:
            self.metrics.observe_auth(time.perf_counter() - started)
            await send_refusal(send, path, refused.error, refused.headers)
            outcome.status, outcome.code = refused.error.status, refused.error.code
            if refused.key is not None:  # the model it asked for, so that refusals are counted under it
                outcome.model = model_named(body)
            self._finish(route, outcome, refused.key, refused.ip or self.enforcer.addresses.of(scope), started)
            return
        self.metrics.observe_auth(time.perf_counter() - started)
        key, ip = admission.key, admission.client_ip
        try:
            if path == MODELS_PATH:
                await send_models(self.kp, admission, send)
                outcome.status = 200
            elif route == MODEL_ROUTE:
                outcome.model = path[len(MODEL_PREFIX):][:200]
                await send_model(self.kp, admission, path[len(MODEL_PREFIX):], send)
                outcome.status = 200
            elif route == STORED_RESPONSE:
                await self.upstream.forward_get_response(admission, path.rpartition("/")[2], receive, send, outcome,
                                                         scope)
            else:
                await self.upstream.forward(admission, path, body, receive, send, outcome, scope)
        except KeyplaneError as error:
            await send_refusal(send, path, error, admission.headers)
            outcome.status, outcome.code = error.status, error.code
        finally:
            # Normally settled before the answer's last byte (Upstream.settle); here a stream the client
            # left, a failure (its reservation is released) or a cancelled request.
            if not outcome.settled:  # no coroutine when it was (every answered request)
                await self.upstream.settle(admission, outcome)
        self._finish(route, outcome, key, ip, started)

    def _finish(self, route: str, outcome: Outcome, key: KeySnapshot | None, ip: str, started: float) -> None:
        latency_ms = round((time.perf_counter() - started) * 1_000_000) / 1000  # round(…, 3) costs ~4x more
        self.metrics.count(route, outcome.status, outcome.code)
        key_id = key.id if key else None
        if key is not None:
            # A request no key vouches for belongs to no organization: it is counted above (keyplane_requests),
            # never stored, so an anonymous flood costs no disk.
            self.kp.usage_buffer.add((  # a row in usage_row.FIELDS order: no dict, no datetime per request
                key.org_id, key_id, key.parent_id, outcome.provider, outcome.model, key.cost_center, key.environment,
                route, None, None, outcome.status, outcome.code, None, outcome.input_tokens, outcome.output_tokens,
                outcome.cache_write_tokens, outcome.cache_read_tokens, outcome.cost_usd, latency_ms, ip or None,
                now_us()))
        if self.log_requests:
            self.kp.access_log.record({"route": route, "status": outcome.status, "code": outcome.code,
                                       "key_id": key_id, "model": outcome.model, "client_ip": ip, "ms": latency_ms})
