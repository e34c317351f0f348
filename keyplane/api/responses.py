"""What the OpenAPI schema says each control-plane route can refuse, in the one error shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. ``scope``, ``details``, ``retry_after``

    code: str
    message: str
    type: str


class ErrorBody(BaseModel):
    """``{"error": {"code", "message", "type", ...}}``: every refusal keyplane answers with."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


_WHY = {
    400: "Invalid request: a refusal the schema cannot express (an unknown scope, a bad CIDR, a NUL byte in the "
         "URL, a body that is not JSON, ...)",
    401: "No valid service-account token (missing_bearer, invalid_api_key)",
    403: "The token lacks the scope this route needs (insufficient_scope), or would grant what it does not hold",
    404: "No such resource in this organization (not_found)",
    409: "Conflicts with what exists (conflict)",
    413: "The request body is too large (payload_too_large)",
    415: "The body is not JSON",
    422: "The input does not match the schema (invalid_request, with details)",
    429: "Too many failed authentications from this address (rate_limited, with Retry-After)",
    503: "The store cannot be reached; nothing was changed (store_unavailable, with Retry-After)",
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


# Every route authenticates, validates its parameters and needs the store.
COMMON = refusals(400, 401, 403, 422, 429, 503)
WITH_BODY = refusals(415)
FOUND = refusals(404)
CONFLICT = refusals(409)
