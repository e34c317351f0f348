"""Control-plane REST routes: thin adapters from HTTP to the service layer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from keyplane.api.auth import keyplane_of, principal
from keyplane.api.responses import COMMON, CONFLICT, FOUND, WITH_BODY
from keyplane.services.principal import Principal
from keyplane.services.schemas import (
    NO_NUL,
    AlertRuleCreate,
    KeyCreate,
    KeyRotate,
    KeyUpdate,
    LimitProfileCreate,
    LimitProfileUpdate,
    McpServerCreate,
    McpServerUpdate,
    ProviderCreate,
    ProviderUpdate,
    ServiceAccountCreate,
)
from keyplane.services.traffic import INCLUDE_SUB_KEYS

Who = Annotated[Principal, Depends(principal)]
# Path parameters: what the schema says here, keyplane/api/edge.py enforces for every route at once.
Ident = Annotated[str, Path(max_length=200, pattern=NO_NUL)]
Limit = Annotated[int, Query(ge=1, le=200, description="Page size")]
Cursor = Annotated[str | None, Query(max_length=200, pattern=NO_NUL, description="next_cursor of the previous page")]
IncludeSubKeys = Annotated[bool, Query(description="With key_id: count the key's sub-keys (at any depth) too, "
                                                   "as they count against its limits. Default true.")]

# A body without a Content-Type is still read as JSON (what `curl --json` and most SDKs do anyway).
router = APIRouter(prefix="/api/v1", strict_content_type=False, responses=COMMON)


# -- virtual keys --------------------------------------------------------------------------------

@router.get("/keys", tags=["keys"])
async def list_keys(
    request: Request,
    who: Who,
    status: Annotated[str | None, Query(pattern="^(enabled|disabled)$")] = None,
    cost_center: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    environment: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    q: Annotated[str | None, Query(max_length=100, pattern=NO_NUL, description="part of the name")] = None,
    parent_id: Annotated[str | None, Query(max_length=40, pattern=NO_NUL)] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    return await keyplane_of(request).keys.list(
        who, status=status, cost_center=cost_center, environment=environment, q=q,
        parent_id=parent_id, cursor=cursor, limit=limit,
    )


@router.post("/keys", status_code=201, tags=["keys"], responses={**FOUND, **WITH_BODY, **CONFLICT})
async def create_key(request: Request, who: Who, body: KeyCreate) -> dict[str, Any]:
    key, secret = await keyplane_of(request).keys.create(who, body)
    return {"key": key, "secret": secret}


@router.get("/keys/{key_id}", tags=["keys"], responses=FOUND)
async def get_key(request: Request, who: Who, key_id: Ident) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.get(who, key_id)}


@router.patch("/keys/{key_id}", tags=["keys"], responses={**FOUND, **WITH_BODY})
async def update_key(request: Request, who: Who, key_id: Ident, body: KeyUpdate) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.update(who, key_id, body)}


@router.delete("/keys/{key_id}", tags=["keys"], responses={**FOUND, **CONFLICT})
async def delete_key(request: Request, who: Who, key_id: Ident, force: bool = False) -> dict[str, Any]:
    return await keyplane_of(request).keys.delete(who, key_id, force=force)


@router.post("/keys/{key_id}/disable", tags=["keys"], responses=FOUND)
async def disable_key(request: Request, who: Who, key_id: Ident) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.set_status(who, key_id, enabled=False)}


@router.post("/keys/{key_id}/enable", tags=["keys"], responses=FOUND)
async def enable_key(request: Request, who: Who, key_id: Ident) -> dict[str, Any]:
    return {"key": await keyplane_of(request).keys.set_status(who, key_id, enabled=True)}


@router.post("/keys/{key_id}/rotate", tags=["keys"], responses={**FOUND, **WITH_BODY, **CONFLICT})
async def rotate_key(request: Request, who: Who, key_id: Ident, body: KeyRotate | None = None) -> dict[str, Any]:
    key, secret = await keyplane_of(request).keys.rotate(who, key_id, body or KeyRotate())
    return {"key": key, "secret": secret}


@router.post("/keys/{key_id}/subkeys", status_code=201, tags=["keys"], responses={**FOUND, **WITH_BODY, **CONFLICT})
async def create_subkey(request: Request, who: Who, key_id: Ident, body: KeyCreate) -> dict[str, Any]:
    key, secret = await keyplane_of(request).keys.create_subkey(who, key_id, body)
    return {"key": key, "secret": secret}


@router.get("/keys/{key_id}/spend", tags=["usage"], responses=FOUND)
async def key_spend(request: Request, who: Who, key_id: Ident) -> dict[str, Any]:
    """The key's spend windows now: settled, reserved by requests in flight, remaining, when each resets."""
    return await keyplane_of(request).spend_status.current(who, key_id)


@router.get("/keys/{key_id}/recommendation", tags=["usage"], responses=FOUND)
async def recommend_limits(
    request: Request, who: Who, key_id: Ident,
    window: Annotated[str, Query(max_length=40, pattern=NO_NUL, description="24h, 7d or RFC 3339")] = "24h",
    include_sub_keys: IncludeSubKeys = INCLUDE_SUB_KEYS,
) -> dict[str, Any]:
    return await keyplane_of(request).recommendations.recommend(who, key_id, window, include_sub_keys)


# -- service accounts ----------------------------------------------------------------------------

@router.get("/service-accounts", tags=["service accounts"])
async def list_service_accounts(request: Request, who: Who, include_revoked: bool = False) -> dict[str, Any]:
    return {"data": await keyplane_of(request).service_accounts.list(who, include_revoked=include_revoked)}


@router.post("/service-accounts", status_code=201, tags=["service accounts"], responses={**WITH_BODY, **CONFLICT})
async def create_service_account(request: Request, who: Who, body: ServiceAccountCreate) -> dict[str, Any]:
    sa, token = await keyplane_of(request).service_accounts.create(who, body)
    return {"service_account": sa, "token": token}


@router.get("/service-accounts/{sa_id}", tags=["service accounts"], responses=FOUND)
async def get_service_account(request: Request, who: Who, sa_id: Ident) -> dict[str, Any]:
    return {"service_account": await keyplane_of(request).service_accounts.get(who, sa_id)}


@router.delete("/service-accounts/{sa_id}", tags=["service accounts"], responses=FOUND)
async def revoke_service_account(request: Request, who: Who, sa_id: Ident) -> dict[str, Any]:
    return {"service_account": await keyplane_of(request).service_accounts.revoke(who, sa_id)}


# -- limit profiles ------------------------------------------------------------------------------

@router.get("/limit-profiles", tags=["limit profiles"])
async def list_limit_profiles(request: Request, who: Who) -> dict[str, Any]:
    return {"data": await keyplane_of(request).limit_profiles.list(who)}


@router.post("/limit-profiles", status_code=201, tags=["limit profiles"], responses={**WITH_BODY, **CONFLICT})
async def create_limit_profile(request: Request, who: Who, body: LimitProfileCreate) -> dict[str, Any]:
    return {"limit_profile": await keyplane_of(request).limit_profiles.create(who, body)}


@router.get("/limit-profiles/{name}", tags=["limit profiles"], responses=FOUND)
async def get_limit_profile(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    return {"limit_profile": await keyplane_of(request).limit_profiles.get(who, name)}


@router.patch("/limit-profiles/{name}", tags=["limit profiles"], responses={**FOUND, **WITH_BODY})
async def update_limit_profile(request: Request, who: Who, name: Ident, body: LimitProfileUpdate) -> dict[str, Any]:
    return {"limit_profile": await keyplane_of(request).limit_profiles.update(who, name, body)}


@router.delete("/limit-profiles/{name}", tags=["limit profiles"], responses={**FOUND, **CONFLICT})
async def delete_limit_profile(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    await keyplane_of(request).limit_profiles.delete(who, name)
    return {"name": name, "deleted": True}


# -- audit ---------------------------------------------------------------------------------------

@router.get("/audit", tags=["audit"])
async def list_audit(
    request: Request,
    who: Who,
    principal: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    action: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    target: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    since: Annotated[str | None, Query(max_length=40, pattern=NO_NUL, description="24h, 30m, 7d or RFC 3339")] = None,
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
async def verify_audit(
    request: Request,
    who: Who,
    full: Annotated[bool, Query(description="Verify from the first entry and hold every signed checkpoint to it "
                                            "(default: from the newest signed checkpoint).")] = False,
) -> dict[str, Any]:
    """Verify the organization's audit chain against the keyed hashes and the signed checkpoints in the
    configured checkpoint directory; name the first entry that does not fit and what is wrong with it."""
    return (await keyplane_of(request).audit.verify(who, full=full)).as_dict()


# -- MCP servers (upstreams served at /mcp/{name}) -----------------------------------------------

@router.get("/mcp-servers", tags=["mcp-servers"])
async def list_mcp_servers(request: Request, who: Who) -> dict[str, Any]:
    return {"data": await keyplane_of(request).mcp_servers.list(who)}


@router.post("/mcp-servers", status_code=201, tags=["mcp-servers"], responses={**WITH_BODY, **CONFLICT})
async def create_mcp_server(request: Request, who: Who, body: McpServerCreate) -> dict[str, Any]:
    """The server, and (unless default_key is false) a key for it and that key's one-time secret."""
    server, key, secret = await keyplane_of(request).mcp_servers.create(who, body)
    return {"mcp_server": server, "key": key, "secret": secret}


@router.get("/mcp-servers/{name}", tags=["mcp-servers"], responses=FOUND)
async def get_mcp_server(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    return {"mcp_server": await keyplane_of(request).mcp_servers.get(who, name)}


@router.patch("/mcp-servers/{name}", tags=["mcp-servers"], responses={**FOUND, **WITH_BODY, **CONFLICT})
async def update_mcp_server(request: Request, who: Who, name: Ident, body: McpServerUpdate) -> dict[str, Any]:
    return {"mcp_server": await keyplane_of(request).mcp_servers.update(who, name, body)}


@router.delete("/mcp-servers/{name}", tags=["mcp-servers"], responses=FOUND)
async def delete_mcp_server(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    return await keyplane_of(request).mcp_servers.delete(who, name)


@router.post("/mcp-servers/{name}/disable", tags=["mcp-servers"], responses=FOUND)
async def disable_mcp_server(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    return {"mcp_server": await keyplane_of(request).mcp_servers.set_status(who, name, enabled=False)}


@router.post("/mcp-servers/{name}/enable", tags=["mcp-servers"], responses=FOUND)
async def enable_mcp_server(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    return {"mcp_server": await keyplane_of(request).mcp_servers.set_status(who, name, enabled=True)}


@router.get("/mcp-servers/{name}/health", tags=["mcp-servers"], responses=FOUND)
async def mcp_server_health(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    """Can keyplane reach the upstream now, and which tools does it offer?"""
    return {"health": await keyplane_of(request).mcp_servers.health(who, name)}


# -- providers -----------------------------------------------------------------------------------

@router.get("/providers", tags=["providers"])
async def list_providers(request: Request, who: Who) -> dict[str, Any]:
    return {"data": await keyplane_of(request).providers.list(who)}


@router.post("/providers", status_code=201, tags=["providers"], responses={**WITH_BODY, **CONFLICT})
async def create_provider(request: Request, who: Who, body: ProviderCreate) -> dict[str, Any]:
    return {"provider": await keyplane_of(request).providers.create(who, body)}


@router.get("/providers/{name}", tags=["providers"], responses=FOUND)
async def get_provider(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    return {"provider": await keyplane_of(request).providers.get(who, name)}


@router.patch("/providers/{name}", tags=["providers"], responses={**FOUND, **WITH_BODY, **CONFLICT})
async def update_provider(request: Request, who: Who, name: Ident, body: ProviderUpdate) -> dict[str, Any]:
    return {"provider": await keyplane_of(request).providers.update(who, name, body)}


@router.delete("/providers/{name}", tags=["providers"], responses=FOUND)
async def delete_provider(request: Request, who: Who, name: Ident) -> dict[str, Any]:
    await keyplane_of(request).providers.delete(who, name)
    return {"name": name, "deleted": True}


# -- usage ---------------------------------------------------------------------------------------

@router.get("/usage/summary", tags=["usage"])
async def usage_summary(
    request: Request,
    who: Who,
    since: Annotated[str, Query(max_length=40, pattern=NO_NUL, description="24h, 7d, 30m or RFC 3339")] = "24h",
    group_by: Annotated[str, Query(
        pattern="^(provider|model|cost_center|environment|key|endpoint|mcp_server|tool|status_class|hour|day)$")]
    = "model",
    key_id: Annotated[str | None, Query(max_length=40, pattern=NO_NUL)] = None,
    include_sub_keys: IncludeSubKeys = INCLUDE_SUB_KEYS,
) -> dict[str, Any]:
    return await keyplane_of(request).usage.summary(who, since=since, group_by=group_by, key_id=key_id,
                                                   include_sub_keys=include_sub_keys)


@router.get("/usage/events", tags=["usage"])
async def usage_events(
    request: Request,
    who: Who,
    since: Annotated[str | None, Query(max_length=40, pattern=NO_NUL)] = None,
    key_id: Annotated[str | None, Query(max_length=40, pattern=NO_NUL)] = None,
    model: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    provider: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
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


@router.post("/alerts", status_code=201, tags=["alerts"], responses={**FOUND, **WITH_BODY, **CONFLICT})
async def create_alert(request: Request, who: Who, body: AlertRuleCreate) -> dict[str, Any]:
    rule, secret = await keyplane_of(request).alerts.create(who, body)
    return {"alert": rule, "signing_secret": secret}


@router.delete("/alerts/{rule_id}", tags=["alerts"], responses=FOUND)
async def delete_alert(request: Request, who: Who, rule_id: Ident) -> dict[str, Any]:
    await keyplane_of(request).alerts.delete(who, rule_id)
    return {"id": rule_id, "deleted": True}


@router.get("/whoami", tags=["service accounts"])
async def whoami(who: Who) -> dict[str, Any]:
    return {"id": who.id, "name": who.name, "org_id": who.org_id, "scopes": sorted(who.scopes)}
