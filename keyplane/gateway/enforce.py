"""Every data-plane request passes here: authenticate the virtual key and apply its whole policy.

Checks run in this order, each with its own error: brake, missing credential, unknown key,
disabled, expired, IP allowlist, route scope, signature, rate limit. A cache hit costs no
database round trip; all state here is in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from keyplane.domain import policy, signing
from keyplane.domain.errors import (
    KeyplaneError,
    auth_error,
    insufficient_scope,
    invalid_api_key,
    missing_bearer,
    too_many_failed_authentications,
)
from keyplane.domain.gcra import Verdict
from keyplane.gateway.asgi import Scope, credentials, header
from keyplane.runtime.limits import LimitsUnavailable, limits_unavailable
from keyplane.services.container import Keyplane


class Refused(Exception):
    def __init__(self, error: KeyplaneError, key: policy.KeySnapshot | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None, ip: str = "") -> None:
        super().__init__(error.code)
        self.error = error
        self.key = key
        self.headers = headers or []
        self.ip = ip


@dataclass(slots=True)
class Admission:
    key: policy.KeySnapshot
    client_ip: str
    headers: list[tuple[bytes, bytes]]


def rate_limited(verdict: Verdict) -> KeyplaneError:
    seconds = max(1, int(verdict.retry_after + 0.999))
    return KeyplaneError(
        429, "rate_limited",
        f"Rate limit of {verdict.limit} requests per minute exceeded; retry in {seconds} s",
        extra={"limit": "requests_per_minute", "retry_after": seconds},
    )


def refusal_for(code: str, key: policy.KeySnapshot | None, ip: str, missing: str | None) -> KeyplaneError:
    if code == policy.NOT_FOUND:
        return invalid_api_key()
    if code == policy.DISABLED:
        return auth_error("key_disabled", "This API key is disabled")
    if code == policy.EXPIRED:
        return auth_error("key_expired", "This API key has expired")
    if code == policy.IP_NOT_ALLOWED:
        return KeyplaneError(403, "ip_not_allowed", f"Requests from {ip or 'an unknown address'} are not allowed "
                                                    "for this key")
    return insufficient_scope(missing or "")


class Enforcer:
    def __init__(self, kp: Keyplane) -> None:
        self.kp = kp
        self.addresses = kp.client_address
        # In memory (embedded) or in Redis (distributed): the container picks, by settings.
        self.limiter = kp.limiter
        self.brake = kp.brake
        self.replays = kp.replays
        self.tracker = kp.tracker

    async def admit(self, scope: Scope, required_scope: str, body: bytes) -> Admission:
        ip = self.addresses.of(scope)
        try:  # one coroutine, not two: this runs on every request
            now = time.time()
            blocked = self.brake.blocked_for(ip, now)
            if blocked:
                raise Refused(too_many_failed_authentications(blocked))
            token, signature = credentials(scope)
            if token is None:
                raise Refused(missing_bearer())
            try:
                key = await self.kp.lookup_key(token)
            except KeyplaneError as exc:  # the store is down and the key is not cached
                raise Refused(exc) from None
            # "" asks for no scope: the MCP gateway decides per JSON-RPC method after admission.
            code, missing = policy.check(key, now, scopes=(required_scope,) if required_scope else (), ip=ip)
            if code != policy.VALID:
                if code == policy.NOT_FOUND:
                    self.brake.fail(ip, now)
                raise Refused(refusal_for(code, key, ip, missing), key)
            assert key is not None
            if key.require_signature or signature is not None:
                checked = signing.check(token, header(scope, b"x-mcp-timestamp"), signature, body, now)
                problem = checked.problem
                # The window remembers the canonical form the check compared: case or padding is no new request.
                if problem is None and not await self.replays.first_use(f"{key.id}:{checked.signature}", now):
                    problem = "This signature was already used: sign every request afresh"
                if problem is not None:
                    self.brake.fail(ip, now)
                    raise Refused(auth_error("invalid_signature", problem), key)
            try:
                verdict = await self.limiter.acquire(key.buckets, now)
            except LimitsUnavailable:
                raise Refused(limits_unavailable(), key) from None
            headers = verdict.headers() if verdict is not None else []
            if verdict is not None and not verdict.allowed:
                raise Refused(rate_limited(verdict), key, headers)
            self.tracker.touch(key.id, now)  # Keyplane.record_use, with this request's time
            return Admission(key, ip, headers)
        except Refused as refused:
            refused.ip = ip  # for the usage event and the access log, without resolving it again
            raise
