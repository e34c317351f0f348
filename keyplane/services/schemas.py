"""Inputs every adapter (REST, CLI, MCP, dashboard) hands to the service layer. Unknown fields are refused.

These types are the one place input is bounded, for every store alike: no text holds NUL (PostgreSQL cannot
store it), no integer exceeds its column (32-bit INTEGER), and numbers are numbers (``false`` is not 0.0).
The OpenAPI schema says all of it, so whatever the schema allows, both stores accept.

Free text (names, labels, scope strings, descriptions, metadata) never holds a keyplane secret: a
well-formed ``mcp_sk_``/``mcp_sa_`` token is refused here, once, for every adapter (422 on the REST API).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from keyplane.domain.secret_scan import refuse_secret
from keyplane.domain.storable import INT32_MAX

NO_NUL = r"^[^\x00]*$"
# Stripped, then at least one character: the pattern lets no text through that stripping empties. The
# whitespace is spelled out (what Python's strip() removes): regex engines disagree on what \s means.
_SPACE = r"\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SOME_TEXT = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"

NoSecret = AfterValidator(refuse_secret)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=_SOME_TEXT),
                 NoSecret]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=_SOME_TEXT),
                  NoSecret]
ProfileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL), NoSecret]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_NUL), NoSecret]
Cidr = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL), NoSecret]
Description = Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL), NoSecret]
MetaKey = Annotated[str, StringConstraints(max_length=100, pattern=NO_NUL), NoSecret]
MetaValue = Annotated[str, StringConstraints(max_length=1000, pattern=NO_NUL), NoSecret]
Metadata = dict[MetaKey, MetaValue]


MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def _is_number(annotation: Any) -> bool:
    return annotation in (int, float) or any(_is_number(arg) for arg in get_args(annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """A number field takes a JSON number and nothing else: ``false`` is not 0.0 and ``"5"`` is not 5
        (16774.0 is an integer, as JSON Schema says)."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, bool | str) and _is_number(field.annotation):
                    raise ValueError(f"{name}: Input should be a number")
        return data


class KeyCreate(Strict):
    name: Name
    scopes: list[Scope] | None = Field(default=None, max_length=32)
    expires_in: int | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS, description="seconds from now")
    expires_at: datetime | None = Field(default=None, description="RFC 3339")
    ip_allowlist: list[Cidr] = Field(default_factory=list, max_length=64)
    limit_profile: ProfileName | None = None
    cost_center: Label | None = None
    environment: Label | None = None
    metadata: Metadata = Field(default_factory=dict, max_length=64)
    allowed_models: list[ModelName] = Field(default_factory=list, max_length=100)
    require_signature: bool = False
    mcp_servers: dict[str, list[str]] | None = Field(
        default=None, description='MCP server name -> tool-name patterns ({"files": ["read_*"]}, ["*"] for all); '
                                  "absent: no MCP server (a sub-key: its parent's)")


class KeyUpdate(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    @model_validator(mode="before")
    @classmethod
    def _something_to_change(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data:
            raise ValueError("Nothing to change: give at least one field")
        return data

    name: Name | None = None
    scopes: list[Scope] | None = Field(default=None, max_length=32)
    metadata: Metadata | None = Field(default=None, max_length=64)
    cost_center: Label | None = None
    environment: Label | None = None
    limit_profile: ProfileName | None = None
    ip_allowlist: list[Cidr] | None = Field(default=None, max_length=64)
    mcp_servers: dict[str, list[str]] | None = Field(default=None, description="narrowing only")


class KeyRotate(Strict):
    grace_seconds: int = Field(default=0, ge=0, le=30 * 24 * 3600)


class ServiceAccountCreate(Strict):
    name: Name
    scopes: list[Scope] = Field(min_length=1, max_length=32)
    description: Description | None = None


class LimitProfileCreate(Strict):
    name: ProfileName
    description: Description | None = None
    requests_per_minute: int | None = Field(default=None, gt=0, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, gt=0, le=INT32_MAX)
    cost_per_day_usd: float | None = Field(default=None, ge=0, le=1e9)
    budget_per_month_usd: float | None = Field(default=None, ge=0, le=1e10)
    clamp_output: bool = Field(default=True, description="an answer longer than the budget pays for: lower "
                                                         "max_tokens to fit (true) or refuse the request (false)")


class LimitProfileUpdate(Strict):
    description: Description | None = None
    requests_per_minute: int | None = Field(default=None, gt=0, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, gt=0, le=INT32_MAX)
    cost_per_day_usd: float | None = Field(default=None, ge=0, le=1e9)
    budget_per_month_usd: float | None = Field(default=None, ge=0, le=1e10)
    clamp_output: bool | None = None


class VerifyRequest(Strict):
    key: Annotated[str, StringConstraints(max_length=200, pattern=NO_NUL)]
    scopes: list[Scope] = Field(default_factory=list, max_length=32)
    ip: Annotated[str, StringConstraints(max_length=64, pattern=NO_NUL)] | None = None


class ModelPrice(Strict):
    name: ModelName
    input_per_mtok: float = Field(default=0.0, ge=0, le=1_000_000, description="USD per million input tokens")
    output_per_mtok: float = Field(default=0.0, ge=0, le=1_000_000, description="USD per million output tokens")
    cache_write_per_mtok: float | None = Field(
        default=None, ge=0, le=1_000_000,
        description="USD per million prompt-cache write tokens (Anthropic cache_creation_input_tokens); "
                    "unset: the input price")
    cache_read_per_mtok: float | None = Field(
        default=None, ge=0, le=1_000_000,
        description="USD per million prompt-cache read tokens (Anthropic cache_read_input_tokens, OpenAI "
                    "cached_tokens); unset: the input price")


# Visible ASCII (an internationalised host is given in its xn-- form), not starting with / $ . ? #: written
# as byte ranges so that every regex engine (pydantic's, the OpenAPI client's) reads it the same.
BaseUrl = Annotated[str, StringConstraints(
    strip_whitespace=True, pattern=r"^https?://[\x21\x22\x25-\x2d\x30-\x3e\x40-\x7e][\x21-\x7e]*$", max_length=500)]


# A provider secret travels in an HTTP header: visible ASCII only (a newline would fail every forward).
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,1000}$")


def _header_safe(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not _HEADER_SAFE.match(value.get_secret_value()):
        raise ValueError("must be 1-1000 visible ASCII characters (it is sent in an HTTP header)")
    return value


ProviderSecret = Annotated[SecretStr, AfterValidator(_header_safe)]
# An upstream MCP server's header value ("Bearer …"): visible ASCII and inner spaces, never CR, LF or NUL.
_HEADER_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,998}[\x21-\x7e])?$")


def _header_value_safe(value: SecretStr) -> SecretStr:
    if not _HEADER_VALUE.match(value.get_secret_value()):
        raise ValueError("must be 1-1000 visible ASCII characters or inner spaces (it is sent in an HTTP header)")
    return value


HeaderValue = Annotated[SecretStr, AfterValidator(_header_value_safe), WithJsonSchema(
    {"type": "string", "format": "password", "writeOnly": True, "pattern": _HEADER_VALUE.pattern,
     "minLength": 1, "maxLength": 1000})]


def _ONLY_NAMED_KEYS(schema: dict[str, Any]) -> None:
    """Header (or variable) names are the object's keys: the schema says no other key is accepted."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "object":
            branch["additionalProperties"] = False
_SECRET_SCHEMA = {"pattern": _HEADER_SAFE.pattern, "minLength": 1, "maxLength": 1000}


class ProviderCreate(Strict):
    name: ProfileName
    kind: Literal["openai", "anthropic"] = Field(
        default="openai", description="openai: OpenAI-compatible (chat, completions, embeddings, responses); "
                                      "anthropic: the native Messages API (/v1/messages)")
    base_url: BaseUrl = Field(description="e.g. https://api.openai.com/v1, https://api.anthropic.com/v1 or "
                                          "http://127.0.0.1:11434/v1")
    api_key: ProviderSecret | None = Field(default=None, description="write-only; omit for servers without auth",
                                           json_schema_extra=_SECRET_SCHEMA)
    models: list[ModelPrice] = Field(min_length=1, max_length=500)
    timeout_seconds: float = Field(default=60.0, gt=0, le=600)


class ProviderUpdate(Strict):
    base_url: BaseUrl | None = None
    api_key: ProviderSecret | None = Field(default=None, description="a new secret (rotation); write-only",
                                           json_schema_extra=_SECRET_SCHEMA)
    models: list[ModelPrice] | None = Field(default=None, min_length=1, max_length=500)
    timeout_seconds: float | None = Field(default=None, gt=0, le=600)


class AlertRuleCreate(Strict):
    name: ProfileName
    kind: Literal["budget", "error_rate", "spike"]
    key_id: Annotated[str, StringConstraints(max_length=40, pattern=NO_NUL), NoSecret] | None = Field(
        default=None, description="the key to watch (required for budget); none: the whole organization")
    mcp_server: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] | None = Field(
        default=None, description="error_rate and spike: only requests to this MCP server (/mcp/{name})")
    threshold: float = Field(gt=0, le=1_000_000, description="budget: fraction spent (0.8); error_rate: fraction "
                                                            "(0.2); spike: factor over the trailing baseline (3)")
    window_minutes: int = Field(default=15, ge=1, le=1440)
    min_requests: int = Field(default=20, ge=1, le=1_000_000)
    webhook_url: BaseUrl
    cooldown_seconds: int = Field(default=3600, ge=0, le=30 * 24 * 3600)


McpServerName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")]
ToolName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL)]


EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


def _no_nul_secret(value: SecretStr) -> SecretStr:
    if "\x00" in value.get_secret_value():
        raise ValueError("must not contain a NUL byte (a process environment cannot hold one)")
    return value


EnvValue = Annotated[SecretStr, AfterValidator(_no_nul_secret), WithJsonSchema(
    {"type": "string", "format": "password", "writeOnly": True, "pattern": NO_NUL, "maxLength": 32768})]
CommandArg = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=NO_NUL)]
Argv = Annotated[list[CommandArg], Field(min_length=1, max_length=256)]
WorkDir = Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$", max_length=500)]


class McpServerCreate(Strict):
    # The schema says what _one_transport checks: a url (HTTP upstream) or a command (stdio), never both.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["url"], "properties": {"url": {"type": "string"}, "command": {"type": "null"},
                                             "env": {"maxProperties": 0}, "cwd": {"type": "null"}}},
        {"required": ["command"], "properties": {"command": {"type": "array"}, "url": {"type": "null"},
                                                 "headers": {"maxProperties": 0}}},
    ]})

    name: McpServerName
    url: BaseUrl | None = Field(default=None, description="the upstream's Streamable HTTP endpoint, e.g. "
                                                          "http://127.0.0.1:9000/mcp (or give command)")
    command: Argv | None = Field(default=None, description="a stdio MCP server keyplane runs, as an argv list, e.g. "
                                 "[\"npx\", \"-y\", \"@modelcontextprotocol/server-filesystem\", \"/srv\"]; its "
                                 "executable must be in KEYPLANE_MCP_STDIO_COMMANDS")
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=64,
                                          description="environment of a stdio server's process; write-only",
                                          json_schema_extra=_ONLY_NAMED_KEYS)
    cwd: WorkDir | None = Field(default=None, description="working directory of a stdio server's process")
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, max_length=32, description="sent upstream on every request; write-only",
        json_schema_extra=_ONLY_NAMED_KEYS)
    tool_scopes: dict[ToolName, Scope] = Field(
        default_factory=dict, max_length=1000, description="tool -> data-plane scope it needs (default tools:call)",
        json_schema_extra=_ONLY_NAMED_KEYS)
    description: Description | None = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    default_key: bool = Field(default=True, description="mint a key granting every tool of this server")

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerCreate:
        if (self.url is None) == (self.command is None):
            raise ValueError("give either url (an HTTP MCP server) or command (a stdio MCP server keyplane runs)")
        if self.url is not None and (self.env or self.cwd):
            raise ValueError("env and cwd are for a stdio server (command), not for url")
        if self.command is not None and self.headers:
            raise ValueError("headers are for an HTTP server (url); a stdio server takes env")
        return self


class McpServerUpdate(Strict):
    url: BaseUrl | None = None
    command: Argv | None = Field(default=None, description="a stdio server's new argv list")
    env: dict[EnvName, EnvValue] | None = Field(default=None, max_length=64,
                                                 description="replaces the whole environment; write-only",
                                                 json_schema_extra=_ONLY_NAMED_KEYS)
    cwd: WorkDir | None = None
    headers: dict[HeaderName, HeaderValue] | None = Field(default=None, max_length=32,
                                                        description="replaces every header; write-only",
                                                        json_schema_extra=_ONLY_NAMED_KEYS)
    tool_scopes: dict[ToolName, Scope] | None = Field(default=None, max_length=1000,
                                                      json_schema_extra=_ONLY_NAMED_KEYS)
    description: Description | None = None
    timeout_seconds: float | None = Field(default=None, gt=0, le=600)
