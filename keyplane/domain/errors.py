"""The one error shape every surface answers with (DESIGN.md, "One error shape everywhere")."""

from __future__ import annotations

from typing import Any

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


# Codes whose type does not follow from the status: an upstream's own 4xx is passed on with its status (the
# client can act on it), yet it is the upstream's error, not a malformed request to keyplane.
_TYPE_BY_CODE = {"upstream_error": "upstream_error", "upstream_timeout": "upstream_error"}


def error_type_for(status: int, code: str | None = None) -> str:
    if code in _TYPE_BY_CODE:
        return _TYPE_BY_CODE[code]
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


class KeyplaneError(Exception):
    """A refusal a client can act on: HTTP status, stable machine code and a human message.

    Messages never contain secrets; callers pass masks, never tokens.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    @property
    def type(self) -> str:
        return error_type_for(self.status, self.code)

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "type": self.type}
        err.update(self.extra)
        return {"error": err}


BEARER_CHALLENGE = 'Bearer realm="keyplane"'


def missing_bearer(message: str = "No API key provided: send 'Authorization: Bearer <key>'") -> KeyplaneError:
    return KeyplaneError(
        401,
        "missing_bearer",
        message,
        headers={"WWW-Authenticate": BEARER_CHALLENGE},
    )


def invalid_api_key(message: str = "The API key provided is invalid or has been revoked") -> KeyplaneError:
    return KeyplaneError(
        401,
        "invalid_api_key",
        message,
        headers={"WWW-Authenticate": f'{BEARER_CHALLENGE}, error="invalid_token"'},
    )


def too_many_failed_authentications(blocked_for: float) -> KeyplaneError:
    """The failed-authentication brake: this address sent too many bad credentials recently."""
    seconds = max(1, int(blocked_for + 0.999))
    return KeyplaneError(429, "rate_limited", "Too many failed authentications from this address; retry later",
                         headers={"Retry-After": str(seconds)},
                         extra={"limit": "failed_authentications", "retry_after": seconds})


def auth_error(code: str, message: str) -> KeyplaneError:
    return KeyplaneError(
        401, code, message, headers={"WWW-Authenticate": f'{BEARER_CHALLENGE}, error="invalid_token"'}
    )


def insufficient_scope(scope: str) -> KeyplaneError:
    return KeyplaneError(
        403,
        "insufficient_scope",
        f"This credential lacks the scope '{scope}' required here",
        headers={"WWW-Authenticate": f'{BEARER_CHALLENGE}, error="insufficient_scope", scope="{scope}"'},
        extra={"scope": scope},
    )


def cannot_grant(scopes: list[str]) -> KeyplaneError:
    listed = ", ".join(sorted(scopes))
    return KeyplaneError(
        403,
        "insufficient_scope",
        f"You cannot grant scopes you do not hold: {listed}",
        extra={"scope": sorted(scopes)[0]},
    )


def parent_lacks(parent_id: str, scopes: list[str]) -> KeyplaneError:
    """A sub-key asked for scopes its parent key does not have (the caller may well hold them)."""
    listed = ", ".join(sorted(scopes))
    return KeyplaneError(
        403,
        "insufficient_scope",
        f"The parent key '{parent_id}' lacks scopes {listed}: a sub-key is never wider than its parent",
        extra={"scope": sorted(scopes)[0]},
    )


def invalid_request(message: str, **extra: Any) -> KeyplaneError:
    return KeyplaneError(400, "invalid_request", message, extra=extra)


def not_found(what: str, ident: str) -> KeyplaneError:
    return KeyplaneError(404, "not_found", f"No {what} with id '{ident}'")


def conflict(message: str, code: str = "conflict") -> KeyplaneError:
    return KeyplaneError(409, code, message)
