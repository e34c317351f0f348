"""Upstream providers: where the gateway forwards, with which secret, at which prices.

The secret is write-only: sealed with AES-GCM on the way in, opened only into the gateway's
in-memory routing table, never returned, logged or audited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from keyplane.domain.errors import conflict
from keyplane.domain.errors import not_found as _not_found
from keyplane.domain.secrets_box import SecretBox
from keyplane.services import audit
from keyplane.services.invalidation import Invalidator
from keyplane.services.principal import Principal, new_id
from keyplane.services.schemas import ProviderCreate, ProviderUpdate
from keyplane.store.db import Database
from keyplane.store.models import Provider


def secret_mask(secret: str) -> str:
    return f"{secret[:3]}…{secret[-4:]}" if len(secret) >= 12 else "…"


def provider_to_dict(p: Provider) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "kind": p.kind,
        "base_url": p.base_url,
        "api_key": p.api_key_mask,  # a mask, or null when none is set
        "models": p.models,
        "timeout_seconds": p.timeout_seconds,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


@dataclass(frozen=True, slots=True)
class Route:
    """What the gateway needs to forward one model's requests."""

    provider_id: str
    provider: str
    base_url: str
    api_key: str | None
    timeout: float
    input_per_mtok: float
    output_per_mtok: float
    kind: str = "openai"
    cache_write_per_mtok: float | None = None  # None: billed as input
    cache_read_per_mtok: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, cache_write_tokens: int = 0,
             cache_read_tokens: int = 0) -> float:
        """USD for one answer. ``input_tokens`` counts every prompt token, the cached ones included;
        those written to or read from the prompt cache are billed at their own prices when set."""
        write_price = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        read_price = self.input_per_mtok if self.cache_read_per_mtok is None else self.cache_read_per_mtok
        plain = max(0, input_tokens - cache_write_tokens - cache_read_tokens)
        return (plain * self.input_per_mtok + cache_write_tokens * write_price + cache_read_tokens * read_price
                + output_tokens * self.output_per_mtok) / 1_000_000


def _model_names(models: list[dict[str, Any]]) -> list[str]:
    return [m["name"] for m in models]


class ProviderService:
    def __init__(self, db: Database, invalidator: Invalidator, box: Callable[[], SecretBox]) -> None:
        self.db = db
        self.invalidator = invalidator
        self.box = box

    async def _get(self, s: AsyncSession, principal: Principal, name: str) -> Provider:
        q = select(Provider).where(Provider.org_id == principal.org_id, Provider.name == name)
        p = (await s.execute(q)).scalar_one_or_none()
        if p is None:
            raise _not_found("provider", name)
        return p

    async def _check_models_free(
        self, s: AsyncSession, principal: Principal, models: list[str], except_id: str | None
    ) -> None:
        if len(set(models)) != len(models):
            raise conflict("A model is listed twice")
        others = (await s.execute(select(Provider).where(Provider.org_id == principal.org_id))).scalars()
        for other in others:
            if other.id == except_id:
                continue
            clash = sorted(set(models) & set(_model_names(other.models)))
            if clash:
                raise conflict(f"Model(s) {', '.join(clash)} already served by provider '{other.name}': "
                               "the model name picks the provider, so it must be unique")

    async def list(self, principal: Principal) -> list[dict[str, Any]]:
        principal.require("providers:manage")
        async with self.db.read() as s:
            q = select(Provider).where(Provider.org_id == principal.org_id).order_by(Provider.pk)
            return [provider_to_dict(p) for p in (await s.execute(q)).scalars()]

    async def get(self, principal: Principal, name: str) -> dict[str, Any]:
        principal.require("providers:manage")
        async with self.db.read() as s:
            return provider_to_dict(await self._get(s, principal, name))

    async def create(self, principal: Principal, data: ProviderCreate) -> dict[str, Any]:
        principal.require("providers:manage")
        models = [m.model_dump(exclude_none=True) for m in data.models]
        async with self.db.write() as s:
            if (await s.execute(select(Provider.id).where(Provider.org_id == principal.org_id,
                                                          Provider.name == data.name))).first():
                raise conflict(f"A provider named '{data.name}' already exists")
            await self._check_models_free(s, principal, _model_names(models), None)
            p = Provider(id=new_id("prv"), org_id=principal.org_id, name=data.name, kind=data.kind,
                         base_url=data.base_url.rstrip("/"), models=models, timeout_seconds=data.timeout_seconds)
            if data.api_key is not None:
                secret = data.api_key.get_secret_value()
                p.api_key_sealed = self.box().seal(secret, p.id)
                p.api_key_mask = secret_mask(secret)
            s.add(p)
            await s.flush()
            await audit.append(s, principal, "provider.create", p.id, {
                "name": p.name, "kind": p.kind, "base_url": p.base_url, "models": _model_names(models),
                "api_key": "set" if data.api_key is not None else "none",
            })
            result = provider_to_dict(p)
        self.invalidator.all()
        return result

    async def update(self, principal: Principal, name: str, data: ProviderUpdate) -> dict[str, Any]:
        principal.require("providers:manage")
        changes = data.model_dump(exclude_unset=True)
        async with self.db.write() as s:
            p = await self._get(s, principal, name)
            audited: dict[str, Any] = {}
            if data.base_url is not None:
                p.base_url = audited["base_url"] = data.base_url.rstrip("/")
            if data.models is not None:
                models = [m.model_dump(exclude_none=True) for m in data.models]
                await self._check_models_free(s, principal, _model_names(models), p.id)
                p.models = models
                audited["models"] = _model_names(models)
            if data.timeout_seconds is not None:
                p.timeout_seconds = audited["timeout_seconds"] = data.timeout_seconds
            if "api_key" in changes:
                if data.api_key is None:
                    p.api_key_sealed = p.api_key_mask = None
                    audited["api_key"] = "removed"
                else:
                    secret = data.api_key.get_secret_value()
                    p.api_key_sealed = self.box().seal(secret, p.id)
                    p.api_key_mask = secret_mask(secret)
                    audited["api_key"] = "rotated"
            p.updated_at = datetime.now(UTC)
            await audit.append(s, principal, "provider.update", p.id, {"name": name, "changes": audited})
            result = provider_to_dict(p)
        self.invalidator.all()
        return result

    async def delete(self, principal: Principal, name: str) -> None:
        principal.require("providers:manage")
        async with self.db.write() as s:
            p = await self._get(s, principal, name)
            await audit.append(s, principal, "provider.delete", p.id, {"name": name})
            await s.delete(p)
        self.invalidator.all()

    async def routes(self, org_id: str) -> dict[str, Route]:
        """model name -> route, secrets opened: for the gateway's in-memory table only."""
        box = self.box()

        def load(s: Session) -> dict[str, Route]:
            out: dict[str, Route] = {}
            for p in s.execute(select(Provider).where(Provider.org_id == org_id)).scalars():
                secret = box.open(p.api_key_sealed, p.id) if p.api_key_sealed else None
                for m in p.models:
                    write, read = m.get("cache_write_per_mtok"), m.get("cache_read_per_mtok")
                    out[m["name"]] = Route(p.id, p.name, p.base_url, secret, p.timeout_seconds,
                                           float(m.get("input_per_mtok", 0)), float(m.get("output_per_mtok", 0)),
                                           p.kind, None if write is None else float(write),
                                           None if read is None else float(read))
            return out

        return await self.db.run_read(load)
