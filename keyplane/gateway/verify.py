"""``POST /api/v1/keys/verify``: any service delegates its key checks to keyplane (hot path)."""

from __future__ import annotations

import time

import orjson
from pydantic import ValidationError

from keyplane.domain import policy, secret_scan
from keyplane.domain.errors import KeyplaneError, invalid_request
from keyplane.domain.scopes import CONTROL_PLANE_ROUTES
from keyplane.gateway.asgi import BodyTooLarge, Receive, Scope, Send, bearer, read_body, send_error, send_json
from keyplane.gateway.enforce import Enforcer
from keyplane.gateway.metrics import Metrics
from keyplane.runtime.limits import LimitsUnavailable, limits_unavailable
from keyplane.services.container import Keyplane
from keyplane.services.schemas import VerifyRequest

VERIFY_PATH = "/api/v1/keys/verify"
RATE_LIMITED = "RATE_LIMITED"
_REQUIRED_SCOPE = CONTROL_PLANE_ROUTES[("POST", VERIFY_PATH)]
_ALLOW_POST = [(b"allow", b"POST")]


def _validation_message(exc: ValidationError) -> KeyplaneError:
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return invalid_request("The request body is not valid JSON")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
        for e in errors[:10]
    )
    err = invalid_request(secret_scan.mask_text(problems))
    err.status = 422
    return err


class VerifyEndpoint:
    """Shares the data plane's lookup, policy checks and rate limiter (not its brake: the caller is a
    trusted service, not the key's holder)."""

    def __init__(self, kp: Keyplane, enforcer: Enforcer, metrics: Metrics) -> None:
        self.kp = kp
        self.limiter = enforcer.limiter
        self.metrics = metrics
        self.max_body = kp.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await send_error(send, KeyplaneError(405, "method_not_allowed", "Use POST"), _ALLOW_POST)
            return
        try:
            caller = await self.kp.authenticate_service_account(bearer(scope), self.kp.client_address.of(scope))
            caller.require(_REQUIRED_SCOPE)
            try:
                raw = await read_body(receive, self.max_body, scope)
            except BodyTooLarge:
                raise KeyplaneError(413, "payload_too_large", f"Bodies are limited to {self.max_body} bytes") from None
            try:
                req = VerifyRequest.model_validate_json(raw or b"{}")
            except ValidationError as exc:
                raise _validation_message(exc) from None
            key = await self.kp.lookup_key(req.key)
            if key is not None and key.org_id != caller.org_id:
                key = None  # another organization's key does not exist for this caller
            code, missing_scope = policy.check(key, time.time(), scopes=req.scopes, ip=req.ip)
        except KeyplaneError as exc:
            await send_error(send, exc)
            self.metrics.count(VERIFY_PATH, exc.status, exc.code)
            return
        headers: list[tuple[bytes, bytes]] = []
        retry_after = None
        if code == policy.VALID and key is not None:
            try:
                verdict = await self.limiter.acquire(key.buckets)
            except LimitsUnavailable:
                error = limits_unavailable()
                await send_error(send, error)
                self.metrics.count(VERIFY_PATH, error.status, error.code)
                return
            if verdict is not None:
                headers = verdict.headers()
                if not verdict.allowed:
                    code = RATE_LIMITED
                    retry_after = max(1, int(verdict.retry_after + 0.999))
            if code == policy.VALID:
                self.kp.record_use(key)
        payload: dict[str, object] = {
            "valid": code == policy.VALID,
            "code": code,
            "key": orjson.Fragment(key.public_json) if key is not None else None,
        }
        if missing_scope:
            payload["missing_scope"] = missing_scope
        if retry_after is not None:
            payload["retry_after"] = retry_after
        await send_json(send, 200, payload, headers)
        self.metrics.count(VERIFY_PATH, 200, code)
