"""The data plane at ``/v1/*``: raw ASGI, one dict lookup to route, one enforcement pass per request."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from keyplane.domain.errors import KeyplaneError, not_found
from keyplane.domain.scopes import DATA_PLANE_ROUTES
from keyplane.gateway.asgi import BodyTooLarge, Receive, Scope, Send, read_body, send_error, send_json
from keyplane.gateway.enforce import Admission, Enforcer, Refused
from keyplane.gateway.metrics import Metrics
from keyplane.services.container import Keyplane

Handler = Callable[[Admission, bytes, Send], Awaitable[int]]


class DataPlane:
    def __init__(self, kp: Keyplane, enforcer: Enforcer, metrics: Metrics) -> None:
        self.kp = kp
        self.enforcer = enforcer
        self.metrics = metrics
        self.max_body = kp.settings.max_body_bytes
        self.log_requests = kp.settings.access_log
        handlers: dict[str, Handler] = {"/v1/models": self.list_models}
        # Routes whose handler arrives with the gateway (providers); their scope is already in the table.
        self.routes = {
            key: (scope, handlers.get(key[1])) for key, scope in DATA_PLANE_ROUTES.items()
        }
        self.paths = {path for _method, path in DATA_PLANE_ROUTES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        route = self.routes.get((scope["method"], path))
        if route is None:
            if path in self.paths:
                error = KeyplaneError(405, "method_not_allowed", f"{scope['method']} is not allowed on {path}")
            else:
                error = not_found("route", path)
            await send_error(send, error)
            self._finish(path, error.status, error.code, None, "", started)
            return
        required_scope, handler = route
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
            ip = self.enforcer.addresses.of(scope)
            self._finish(path, refused.error.status, refused.error.code,
                         refused.key.id if refused.key else None, ip, started)
            return
        self.metrics.auth_seconds.observe(time.perf_counter() - started)
        if handler is None:
            error = KeyplaneError(404, "not_found", f"No provider is configured to serve {path} yet")
            await send_error(send, error, admission.headers)
            self._finish(path, 404, error.code, admission.key.id, admission.client_ip, started)
            return
        status = await handler(admission, body, send)
        self._finish(path, status, "ok", admission.key.id, admission.client_ip, started)

    def _finish(self, route: str, status: int, code: str, key_id: str | None, ip: str, started: float) -> None:
        self.metrics.count(route, status, code)
        if self.log_requests:
            self.kp.access_log.record({"route": route, "status": status, "code": code, "key_id": key_id,
                                       "client_ip": ip, "ms": round((time.perf_counter() - started) * 1000, 3)})

    async def list_models(self, admission: Admission, _body: bytes, send: Send) -> int:
        """The models this key may use, from keyplane's own configuration (no upstream call)."""
        allowed = admission.key.allowed_models
        models = [m for m in self.kp.configured_models() if not allowed or m["id"] in allowed]
        await send_json(send, 200, {"object": "list", "data": models}, admission.headers)
        return 200
