"""The model APIs the gateway forwards, and how each one speaks: who serves it, where usage is, how errors look.

    path                          provider kind   streams   usage read from
    /v1/chat/completions          openai          yes       body.usage / the stream's last chunk (include_usage)
    /v1/completions               openai          yes       same
    /v1/embeddings                openai          no        body.usage
    /v1/responses                 openai          yes       body.usage / ``response.completed`` (also
                                                            ``response.incomplete``, ``response.failed``)
    /v1/messages                  anthropic       yes       body.usage / ``message_start`` + ``message_delta``
    /v1/messages/count_tokens     anthropic       no        not metered (counting is free)

Every API is authenticated, limited and metered by the same code (enforce.py, proxy.py, dataplane.py);
only what this table says differs. Token counts are normalized to :class:`Tokens`: ``input`` is every
prompt token the model read, cached ones included, so token limits and summaries mean the same thing
for every API; ``cache_write``/``cache_read`` are the parts of it billed at the cache prices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from keyplane.domain.errors import KeyplaneError

OPENAI = "openai"
ANTHROPIC = "anthropic"
PROVIDER_KINDS = (OPENAI, ANTHROPIC)
ANTHROPIC_VERSION = "2023-06-01"  # sent when a client names none: the Messages API requires the header


class Tokens(NamedTuple):  # a tuple, not a frozen dataclass: one per answer, built by _tokens (~0.15 µs, not 1)
    input: int = 0
    output: int = 0
    cache_write: int = 0
    cache_read: int = 0


def _tokens(values: tuple[int, int, int, int]) -> Tokens:
    return _new_tuple(Tokens, values)  # type: ignore[no-any-return]


_new_tuple = tuple.__new__  # Tokens(...) runs NamedTuple's __new__ in Python; this is the same tuple, in C


@dataclass(frozen=True, slots=True)
class Api:
    name: str  # short, for usage summaries: chat, completions, embeddings, responses, messages, count_tokens
    provider_kind: str
    streams: bool = False
    metered: bool = True
    ask_stream_usage: bool = False  # Chat Completions reports usage on streams only when asked
    forwarded_headers: tuple[bytes, ...] = ()
    agent_sized: bool = False  # bodies up to KEYPLANE_MAX_AGENT_BODY_BYTES: a whole agent conversation
    # The fields that bound the answer's length, the one set when keyplane caps it first (gateway/budget.py);
    # none: the answer has no output tokens (embeddings).
    output_fields: tuple[str, ...] = ()


APIS: dict[str, Api] = {
    "/v1/chat/completions": Api("chat", OPENAI, streams=True, ask_stream_usage=True,
                                output_fields=("max_tokens", "max_completion_tokens")),
    "/v1/completions": Api("completions", OPENAI, streams=True, ask_stream_usage=True,
                           output_fields=("max_tokens",)),
    "/v1/embeddings": Api("embeddings", OPENAI),
    "/v1/responses": Api("responses", OPENAI, streams=True, agent_sized=True, output_fields=("max_output_tokens",)),
    "/v1/messages": Api("messages", ANTHROPIC, streams=True, agent_sized=True, output_fields=("max_tokens",),
                        forwarded_headers=(b"anthropic-version", b"anthropic-beta")),
    "/v1/messages/count_tokens": Api("count_tokens", ANTHROPIC, metered=False, agent_sized=True,
                                     forwarded_headers=(b"anthropic-version", b"anthropic-beta")),
}

RESPONSES_PATH = "/v1/responses"
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0  # JSON's integers: never a bool


def openai_tokens(usage: dict[str, Any]) -> Tokens:
    """Chat/Completions/Embeddings (``prompt_tokens``…) and Responses (``input_tokens``…) usage objects."""
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return _tokens((_int(usage.get("prompt_tokens")) or _int(usage.get("input_tokens")),
                    _int(usage.get("completion_tokens")) or _int(usage.get("output_tokens")), 0, cached))


def anthropic_tokens(usage: dict[str, Any]) -> Tokens:
    """Anthropic's ``input_tokens`` excludes the cached part; keyplane's ``input`` includes it."""
    write = _int(usage.get("cache_creation_input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    return _tokens((_int(usage.get("input_tokens")) + write + read, _int(usage.get("output_tokens")), write, read))


class UsageReader:
    """Follows one answer's usage: a whole JSON body, or the events of a stream as they pass."""

    __slots__ = ("api", "raw", "response_id")

    def __init__(self, api: Api) -> None:
        self.api = api
        self.raw: dict[str, Any] = {}  # the usage fields seen so far (Anthropic streams send them in parts)
        self.response_id: str | None = None

    def tokens(self) -> Tokens | None:
        if not self.raw:
            return None
        return anthropic_tokens(self.raw) if self.api.provider_kind == ANTHROPIC else openai_tokens(self.raw)

    def body(self, body: Any) -> None:
        if not isinstance(body, dict):
            return
        if self.api.name == "responses" and isinstance(body.get("id"), str):
            self.response_id = body["id"]
        usage = body.get("usage")
        if isinstance(usage, dict):
            self.raw = dict(usage)

    def event(self, event: Any) -> None:
        """One decoded ``data:`` payload of a stream."""
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if self.api.provider_kind == ANTHROPIC:
            if kind == "message_start" and isinstance(event.get("message"), dict):
                usage = event["message"].get("usage")
            elif kind == "message_delta":
                usage = event.get("usage")  # cumulative counts: a later value replaces an earlier one
            else:
                return
            if isinstance(usage, dict):
                self.raw.update({k: v for k, v in usage.items() if v is not None})
        elif self.api.name == "responses":
            response = event.get("response")
            if not isinstance(response, dict):
                return
            if isinstance(response.get("id"), str):
                self.response_id = response["id"]
            if kind in _RESPONSE_DONE and isinstance(response.get("usage"), dict):
                self.raw = dict(response["usage"])
        elif isinstance(event.get("usage"), dict):
            self.raw = dict(event["usage"])


# -- the Anthropic error shape, for /v1/messages* ---------------------------------------------------------

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 529: "overloaded_error"}


def speaks_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(error: KeyplaneError) -> dict[str, Any]:
    """``{"type":"error","error":{"type":…,"message":…}}``, so Anthropic's SDKs raise their own exception
    classes (AuthenticationError, PermissionDeniedError, RateLimitError, …). keyplane's code leads the
    message and stays machine-readable as ``error.code``, with the same extra fields as keyplane's shape."""
    kind = _ANTHROPIC_TYPES.get(error.status) or ("api_error" if error.status >= 500 else "invalid_request_error")
    detail: dict[str, Any] = {"type": kind, "message": f"{error.code}: {error.message}", "code": error.code}
    detail.update({k: v for k, v in error.extra.items() if k not in detail})
    return {"type": "error", "error": detail}
