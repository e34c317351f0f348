"""Inputs every adapter (REST, CLI, MCP, dashboard) hands to the service layer. Unknown fields are refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
ProfileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Cidr = Annotated[str, StringConstraints(min_length=1, max_length=64)]

MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyCreate(Strict):
    name: Name
    scopes: list[Scope] | None = Field(default=None, max_length=32)
    expires_in: int | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS, description="seconds from now")
    expires_at: datetime | None = Field(default=None, description="RFC 3339")
    ip_allowlist: list[Cidr] = Field(default_factory=list, max_length=64)
    limit_profile: ProfileName | None = None
    cost_center: Label | None = None
    environment: Label | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    allowed_models: list[ModelName] = Field(default_factory=list, max_length=100)
    require_signature: bool = False


class KeyUpdate(Strict):
    name: Name | None = None
    scopes: list[Scope] | None = Field(default=None, max_length=32)
    metadata: dict[str, str] | None = None
    cost_center: Label | None = None
    environment: Label | None = None
    limit_profile: ProfileName | None = None
    ip_allowlist: list[Cidr] | None = Field(default=None, max_length=64)


class KeyRotate(Strict):
    grace_seconds: int = Field(default=0, ge=0, le=30 * 24 * 3600)


class ServiceAccountCreate(Strict):
    name: Name
    scopes: list[Scope] = Field(min_length=1, max_length=32)
    description: Annotated[str, StringConstraints(max_length=500)] | None = None


class LimitProfileCreate(Strict):
    name: ProfileName
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    requests_per_minute: int | None = Field(default=None, gt=0, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, gt=0, le=10_000_000_000)
    cost_per_day_usd: float | None = Field(default=None, ge=0, le=1e9)
    budget_per_month_usd: float | None = Field(default=None, ge=0, le=1e10)


class LimitProfileUpdate(Strict):
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    requests_per_minute: int | None = Field(default=None, gt=0, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, gt=0, le=10_000_000_000)
    cost_per_day_usd: float | None = Field(default=None, ge=0, le=1e9)
    budget_per_month_usd: float | None = Field(default=None, ge=0, le=1e10)


class VerifyRequest(Strict):
    key: Annotated[str, StringConstraints(max_length=200)]
    scopes: list[Scope] = Field(default_factory=list, max_length=32)
    ip: Annotated[str, StringConstraints(max_length=64)] | None = None


class ModelPrice(Strict):
    name: ModelName
    input_per_mtok: float = Field(default=0.0, ge=0, le=1_000_000, description="USD per million input tokens")
    output_per_mtok: float = Field(default=0.0, ge=0, le=1_000_000, description="USD per million output tokens")


BaseUrl = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^https?://[^\s/$.?#][^\s]*$",
                                           max_length=500)]


class ProviderCreate(Strict):
    name: ProfileName
    kind: Literal["openai"] = "openai"
    base_url: BaseUrl = Field(description="e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1")
    api_key: SecretStr | None = Field(default=None, description="write-only; omit for servers without auth")
    models: list[ModelPrice] = Field(min_length=1, max_length=500)
    timeout_seconds: float = Field(default=60.0, gt=0, le=600)


class ProviderUpdate(Strict):
    base_url: BaseUrl | None = None
    api_key: SecretStr | None = Field(default=None, description="a new secret (rotation); write-only")
    models: list[ModelPrice] | None = Field(default=None, min_length=1, max_length=500)
    timeout_seconds: float | None = Field(default=None, gt=0, le=600)


class AlertRuleCreate(Strict):
    name: ProfileName
    kind: Literal["budget", "error_rate", "spike"]
    key_id: Annotated[str, StringConstraints(max_length=40)] | None = Field(
        default=None, description="the key to watch (required for budget); none: the whole organization")
    threshold: float = Field(gt=0, le=1_000_000, description="budget: fraction spent (0.8); error_rate: fraction "
                                                            "(0.2); spike: factor over the trailing baseline (3)")
    window_minutes: int = Field(default=15, ge=1, le=1440)
    min_requests: int = Field(default=20, ge=1, le=1_000_000)
    webhook_url: BaseUrl
    cooldown_seconds: int = Field(default=3600, ge=0, le=30 * 24 * 3600)
