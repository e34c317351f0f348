"""Inputs every adapter (REST, CLI, MCP, dashboard) hands to the service layer. Unknown fields are refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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
