"""Control-plane REST routes: thin adapters from HTTP to the service layer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from keyplane.api.auth import keyplane_of, principal
from keyplane.services.principal import Principal
from keyplane.services.schemas import (
    AlertRuleCreate,
    KeyCreate,
    KeyRotate,
    KeyUpdate,
    LimitProfileCreate,
    LimitProfileUpdate,
    ProviderCreate,
    ProviderUpdate,
    ServiceAccountCreate,
)

Who = Annotated[Principal, Depends(principal)]
Limit = Annotated[int, Query(ge=1, le=200, description="Page size")]
Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")]

# A body without a Content-Type is still read as JSON (what `curl --json` and most SDKs do anyway).
router = APIRouter(prefix="/api/v1", strict_content_type=False)


# -- virtual keys --------------------------------------------------------------------------------

@router.get("/keys", tags=["keys"])
async def list_keys(
    request: Request,
    who: Who,
    status: Annotated[str | None, Query(pattern="^(enabled|disabled)$")] = None,
    cost_center: Annotated[str | None, Query(max_length=100)] = None,
    environment: Annotated[str | None, Query(max_length=100)] = None,
    q: Annotated[str | None, Query(max_length=100, description="part of the name")] = None,
    parent_id: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    return await keyplane_of(request).keys.list(
        who, status=status, cost_center=cost_center, environment=environment, q=q,
        parent_id=parent_id, cursor=cursor, limit=limit,
    )


@router.post("/keys", status_code=201, tags=["keys"])
async def create_key(request: Request, who: Who, body: KeyCreate) -> dict[str, Any]:
    key, secret = await keyplane_of(request).keys.create(who, body)
    return {"key": key, "secret": secret}


@router.get("/keys/{key_id}", tags=["keys"])
async def get_key(request: Request, who: Who, key_id: str) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.get(who, key_id)}


@router.patch("/keys/{key_id}", tags=["keys"])
async def update_key(request: Request, who: Who, key_id: str, body: KeyUpdate) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.update(who, key_id, body)}


@router.delete("/keys/{key_id}", tags=["keys"])
async def delete_key(request: Request, who: Who, key_id: str, force: bool = False) -> dict[str, Any]:
    return await keyplane_of(request).keys.delete(who, key_id, force=force)


@router.post("/keys/{key_id}/disable", tags=["keys"])
async def disable_key(request: Request, who: Who, key_id: str) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.set_status(who, key_id, enabled=False)}


@router.post("/keys/{key_id}/enable", tags=["keys"])
async def enable_key(request: Request, who: Who, key_id: str) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.set_status(who, key_id, enabled=True)}


@router.post("/keys/{key_id}/rotate", tags=["keys"])
async def rotate_key(request: Request, who: Who, key_id: str, body: KeyRotate | None = None) -> dict[str, Any]:
    key, secret = await keyplane_of(request).keys.rotate(who, key_id, body or KeyRotate())
    return {"key": key, "secret": secret}


@router.post("/keys/{key_id}/subkeys", status_code=201, tags=["keys"])
async def create_subkey(request: Request, who: Who, key_id: str, body: KeyCreate) -> dict[str, Any]:
    key, secret = await keyplane_of(request).keys.create_subkey(who, key_id, body)
    return {"key": key, "secret": secret}


@router.get("/keys/{key_id}/recommendation", tags=["usage"])
async def recommend_limits(
    request: Request, who: Who, key_id: str,
    window: Annotated[str, Query(max_length=40, description="24h, 7d or RFC 3339")] = "24h",
) -> dict[str, Any]:
    return await keyplane_of(request).recommendations.recommend(who, key_id, window)


# -- service accounts ----------------------------------------------------------------------------

@router.get("/service-accounts", tags=["service accounts"])
async def list_service_accounts(request: Request, who: Who, include_revoked: bool = False) -> dict[str, Any]:
    return {"data": await keyplane_of(request).service_accounts.list(who, include_revoked=include_revoked)}


@router.post("/service-accounts", status_code=201, tags=["service accounts"])
async def create_service_account(request: Request, who: Who, body: ServiceAccountCreate) -> dict[str, Any]:
    sa, token = await keyplane_of(request).service_accounts.create(who, body)
    return {"service_account": sa, "token": token}


@router.get("/service-accounts/{sa_id}", tags=["service accounts"])
async def get_service_account(request: Request, who: Who, sa_id: str) -> dict[str, Any]:
    return {"service_account": await keyplane_of(request).service_accounts.get(who, sa_id)}


@router.delete("/service-accounts/{sa_id}", tags=["service accounts"])
async def revoke_service_account(request: Request, who: Who, sa_id: str) -> dict[str, Any]:
    return {"service_account": await keyplane_of(request).service_accounts.revoke(who, sa_id)}


# -- limit profiles ------------------------------------------------------------------------------

@router.get("/limit-profiles", tags=["limit profiles"])
async def list_limit_profiles(request: Request, who: Who) -> dict[str, Any]:
    return {"data": await keyplane_of(request).limit_profiles.list(who)}


@router.post("/limit-profiles", status_code=201, tags=["limit profiles"])
async def create_limit_profile(request: Request, who: Who, body: LimitProfileCreate) -> dict[str, Any]:
    return {"limit_profile": await keyplane_of(request).limit_profiles.create(who, body)}


@router.get("/limit-profiles/{name}", tags=["limit profiles"])
async def get_limit_profile(request: Request, who: Who, name: str) -> dict[str, Any]:
    return {"limit_profile": await keyplane_of(request).limit_profiles.get(who, name)}


@router.patch("/limit-profiles/{name}", tags=["limit profiles"])
async def update_limit_profile(request: Request, who: Who, name: str, body: LimitProfileUpdate) -> dict[str, Any]:
    return {"limit_profile": await keyplane_of(request).limit_profiles.update(who, name, body)}


@router.delete("/limit-profiles/{name}", tags=["limit profiles"])
async def delete_limit_profile(request: Request, who: Who, name: str) -> dict[str, Any]:
    await keyplane_of(request).limit_profiles.delete(who, name)
    return {"name": name, "deleted": True}


# -- audit ---------------------------------------------------------------------------------------

@router.get("/audit", tags=["audit"])
async def list_audit(
    request: Request,
    who: Who,
    principal: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
    target: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[str | None, Query(max_length=40, description="24h, 30m, 7d or RFC 3339")] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    return await keyplane_of(request).audit.list(
        who, principal_filter=principal, action=action, target=target, since=since, cursor=cursor, limit=limit
    )


@router.get("/audit/activity", tags=["audit"])
async def audit_activity(request: Request, who: Who, days: Annotated[int, Query(ge=1, le=366)] = 14) -> dict[str, Any]:
    return await keyplane_of(request).audit.activity(who, days=days)


@router.get("/audit/verify", tags=["audit"])
async def verify_audit(request: Request, who: Who) -> dict[str, Any]:
    return (await keyplane_of(request).audit.verify(who)).as_dict()


# -- providers -----------------------------------------------------------------------------------

@router.get("/providers", tags=["providers"])
async def list_providers(request: Request, who: Who) -> dict[str, Any]:
    return {"data": await keyplane_of(request).providers.list(who)}


@router.post("/providers", status_code=201, tags=["providers"])
async def create_provider(request: Request, who: Who, body: ProviderCreate) -> dict[str, Any]:
    return {"provider": await keyplane_of(request).providers.create(who, body)}


@router.get("/providers/{name}", tags=["providers"])
async def get_provider(request: Request, who: Who, name: str) -> dict[str, Any]:
    return {"provider": await keyplane_of(request).providers.get(who, name)}


@router.patch("/providers/{name}", tags=["providers"])
async def update_provider(request: Request, who: Who, name: str, body: ProviderUpdate) -> dict[str, Any]:
    return {"provider": await keyplane_of(request).providers.update(who, name, body)}


@router.delete("/providers/{name}", tags=["providers"])
async def delete_provider(request: Request, who: Who, name: str) -> dict[str, Any]:
    await keyplane_of(request).providers.delete(who, name)
    return {"name": name, "deleted": True}


# -- usage ---------------------------------------------------------------------------------------

@router.get("/usage/summary", tags=["usage"])
async def usage_summary(
    request: Request,
    who: Who,
    since: Annotated[str, Query(max_length=40, description="24h, 7d, 30m or RFC 3339")] = "24h",
    group_by: Annotated[str, Query(pattern="^(provider|model|cost_center|environment|key|endpoint|hour|day)$")]
    = "model",
    key_id: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    return await keyplane_of(request).usage.summary(who, since=since, group_by=group_by, key_id=key_id)


@router.get("/usage/events", tags=["usage"])
async def usage_events(
    request: Request,
    who: Who,
    since: Annotated[str | None, Query(max_length=40)] = None,
    key_id: Annotated[str | None, Query(max_length=40)] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    provider: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[int | None, Query(ge=100, le=599)] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    return await keyplane_of(request).usage.events(who, since=since, key_id=key_id, model=model, provider=provider,
                                                  status=status, cursor=cursor, limit=limit)


# -- alerts --------------------------------------------------------------------------------------

@router.get("/alerts", tags=["alerts"])
async def list_alerts(request: Request, who: Who) -> dict[str, Any]:
    return {"data": await keyplane_of(request).alerts.list(who)}


@router.post("/alerts", status_code=201, tags=["alerts"])
async def create_alert(request: Request, who: Who, body: AlertRuleCreate) -> dict[str, Any]:
    rule, secret = await keyplane_of(request).alerts.create(who, body)
    return {"alert": rule, "signing_secret": secret}


@router.delete("/alerts/{rule_id}", tags=["alerts"])
async def delete_alert(request: Request, who: Who, rule_id: str) -> dict[str, Any]:
    await keyplane_of(request).alerts.delete(who, rule_id)
    return {"id": rule_id, "deleted": True}


@router.get("/whoami", tags=["service accounts"])
async def whoami(who: Who) -> dict[str, Any]:
    return {"id": who.id, "name": who.name, "org_id": who.org_id, "scopes": sorted(who.scopes)}
