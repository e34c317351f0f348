"""The data plane at ``/v1/*``: raw ASGI, one dict lookup to route, one enforcement pass per request."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from keyplane.domain.errors import KeyplaneError, not_found
from keyplane.domain.policy import KeySnapshot
from keyplane.domain.scopes import DATA_PLANE_ROUTES
from keyplane.gateway.asgi import BodyTooLarge, Receive, Scope, Send, read_body, send_error
from keyplane.gateway.enforce import Enforcer, Refused
from keyplane.gateway.metrics import Metrics
from keyplane.gateway.proxy import Outcome, Upstream, send_models
from keyplane.services.container import Keyplane

MODELS_PATH = "/v1/models"


class DataPlane:
    def __init__(self, kp: Keyplane, enforcer: Enforcer, metrics: Metrics, upstream: Upstream) -> None:
        self.kp = kp
        self.enforcer = enforcer
        self.metrics = metrics
        self.upstream = upstream
        self.max_body = kp.settings.max_body_bytes
        self.log_requests = kp.settings.access_log
        self.routes = dict(DATA_PLANE_ROUTES)
        self.paths = {path for _method, path in DATA_PLANE_ROUTES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        required_scope = self.routes.get((scope["method"], path))
        outcome = Outcome()
        key: KeySnapshot | None = None
        ip = ""
        if required_scope is None:
            if path in self.paths:
                error = KeyplaneError(405, "method_not_allowed", f"{scope['method']} is not allowed on {path}")
            else:
                error = not_found("route", path)
            await send_error(send, error)
            outcome.status, outcome.code = error.status, error.code
            self._finish(path, outcome, None, ip, started)
            return
        try:
            try:
                body = await read_body(receive, self.max_body, scope)
            except BodyTooLarge:
                raise Refused(KeyplaneError(413, "payload_too_large",
                                            f"Request bodies are limited to {self.max_body} bytes")) from None
            admission = await self.enforcer.admit(scope, required_scope, body)
        except Refused as refused:
            self.metrics.auth_seconds.observe(time.perf_counter() - started)
            await send_error(send, refused.error, refused.headers)
            outcome.status, outcome.code = refused.error.status, refused.error.code
            self._finish(path, outcome, refused.key, refused.ip or self.enforcer.addresses.of(scope), started)
            return
        self.metrics.auth_seconds.observe(time.perf_counter() - started)
        key, ip = admission.key, admission.client_ip
        try:
            if path == MODELS_PATH:
                await send_models(self.kp, admission, send)
                outcome.status = 200
            else:
                await self.upstream.forward(admission, path, body, receive, send, outcome)
        except KeyplaneError as error:
            await send_error(send, error, admission.headers)
            outcome.status, outcome.code = error.status, error.code
        if outcome.input_tokens or outcome.output_tokens or outcome.cost_usd:
            # After the answer went out; counted before this request's task ends.
            await self.kp.spend.add(key.spend_buckets, outcome.input_tokens + outcome.output_tokens, outcome.cost_usd)
        self._finish(path, outcome, key, ip, started)

    def _finish(self, route: str, outcome: Outcome, key: KeySnapshot | None, ip: str, started: float) -> None:
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.count(route, outcome.status, outcome.code)
        key_id = key.id if key else None
        self.kp.usage_buffer.add({
            "org_id": key.org_id if key else None, "key_id": key_id, "parent_id": key.parent_id if key else None,
            "provider": outcome.provider, "model": outcome.model, "endpoint": route, "status": outcome.status,
            "code": outcome.code, "input_tokens": outcome.input_tokens, "output_tokens": outcome.output_tokens,
            "cost_usd": outcome.cost_usd, "latency_ms": latency_ms, "client_ip": ip or None,
            "cost_center": key.cost_center if key else None, "environment": key.environment if key else None,
            "time": datetime.now(UTC),
        })
        if self.log_requests:
            self.kp.access_log.record({"route": route, "status": outcome.status, "code": outcome.code,
                                       "key_id": key_id, "model": outcome.model, "client_ip": ip, "ms": latency_ms})
