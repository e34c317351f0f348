"""``keyplane keys …``: virtual keys (mint, list, edit, disable, rotate, delete, recommend limits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from keyplane.cli.shell import (
    PLAIN_HELP,
    AsJson,
    Org,
    SubKeys,
    _emit,
    _fail,
    _principal,
    _print_json,
    _show_secret,
    print_table,
    run,
)
from keyplane.services.container import Keyplane
from keyplane.services.schemas import KeyCreate, KeyRotate, KeyUpdate
from keyplane.services.traffic import INCLUDE_SUB_KEYS

keys_app = typer.Typer(help="Virtual keys (mcp_sk_…).", no_args_is_help=True, **PLAIN_HELP)


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep:
            _fail(f"invalid_request: --meta takes key=value, not '{pair}'")
        out[k] = v
    return out

KEY_COLUMNS = ("id", "name", "masked_key", "status", "scopes", "limit_profile", "cost_center", "environment",
               "expires_at", "last_used_at")


@keys_app.command("create")
def keys_create(
    name: str,
    scope: Annotated[list[str] | None, typer.Option("--scope", "-s", help="Data-plane scope (repeat).")] = None,
    expires_in: Annotated[int | None, typer.Option(help="Seconds until it expires.")] = None,
    expires_at: Annotated[str | None, typer.Option(help="RFC 3339 expiry.")] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="Allowed CIDR (repeat).")] = None,
    limit_profile: Annotated[str | None, typer.Option(help="Limit profile name.")] = None,
    cost_center: Annotated[str | None, typer.Option()] = None,
    environment: Annotated[str | None, typer.Option()] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="key=value (repeat).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Allowed model (repeat).")] = None,
    require_signature: Annotated[bool, typer.Option(help="Require signed requests.")] = False,
    parent: Annotated[str | None, typer.Option(help="Mint a sub-key under this key id.")] = None,
    mcp_server: Annotated[list[str] | None, typer.Option(
        "--mcp-server", help="NAME=PATTERN[,PATTERN…]: MCP server and the tools it may call (repeat).")] = None,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Mint a virtual key; its secret is printed once."""
    data: dict[str, Any] = {"name": name, "expires_in": expires_in, "expires_at": expires_at,
                            "ip_allowlist": ip or [], "limit_profile": limit_profile, "cost_center": cost_center,
                            "environment": environment, "metadata": _metadata(meta) or {},
                            "allowed_models": model or [], "require_signature": require_signature}
    if scope:
        data["scopes"] = scope
    if mcp_server:
        data["mcp_servers"] = {n: p.split(",") for n, _, p in (pair.partition("=") for pair in mcp_server)}

    async def job(kp: Keyplane) -> tuple[dict[str, Any], str]:
        who = await _principal(kp, org)
        body = KeyCreate.model_validate(data)
        if parent:
            return await kp.keys.create_subkey(who, parent, body)
        return await kp.keys.create(who, body)

    key, secret = run(job)
    if as_json:
        _print_json({"key": key, "secret": secret})
        return
    print_table([key], KEY_COLUMNS[:6])
    _show_secret("secret", secret)


@keys_app.command("list")
def keys_list(
    status: Annotated[str | None, typer.Option(help="enabled or disabled")] = None,
    cost_center: Annotated[str | None, typer.Option()] = None,
    environment: Annotated[str | None, typer.Option()] = None,
    q: Annotated[str | None, typer.Option("-q", help="Part of the name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """List keys (newest first)."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.keys.list(await _principal(kp, org), status=status, cost_center=cost_center,
                                  environment=environment, q=q, limit=limit)

    page = run(job)
    _emit(page, as_json, page["data"], KEY_COLUMNS)


@keys_app.command("get")
def keys_get(key_id: str, org: Org = "default") -> None:
    """Show one key as JSON."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.keys.get(await _principal(kp, org), key_id)

    _print_json(run(job))


@keys_app.command("update")
def keys_update(
    key_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    scope: Annotated[list[str] | None, typer.Option("--scope", "-s", help="Narrowed scope set (repeat).")] = None,
    limit_profile: Annotated[str | None, typer.Option()] = None,
    cost_center: Annotated[str | None, typer.Option()] = None,
    environment: Annotated[str | None, typer.Option()] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="Replace metadata: key=value (repeat).")] = None,
    org: Org = "default",
) -> None:
    """Edit a key's name, metadata, cost center, environment, limit profile, or narrow its scopes."""
    changes: dict[str, Any] = {}
    for field, value in (("name", name), ("scopes", scope), ("limit_profile", limit_profile),
                         ("cost_center", cost_center), ("environment", environment), ("metadata", _metadata(meta))):
        if value is not None:
            changes[field] = value

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.keys.update(await _principal(kp, org), key_id, KeyUpdate.model_validate(changes))

    _print_json(run(job))


def _status_command(enabled: bool) -> Callable[..., None]:
    def command(key_id: str, org: Org = "default") -> None:
        async def job(kp: Keyplane) -> dict[str, Any]:
            return await kp.keys.set_status(await _principal(kp, org), key_id, enabled)

        key = run(job)
        typer.echo(f"{key['id']} is {key['status']}")

    command.__doc__ = "Re-enable a disabled key." if enabled else "Disable a key at once (reversible)."
    return command


keys_app.command("disable")(_status_command(False))
keys_app.command("enable")(_status_command(True))


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace_seconds: Annotated[int, typer.Option("--grace", help="Seconds the old secret keeps working.")] = 0,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Issue a new secret; the old one works for the grace period, then stops."""

    async def job(kp: Keyplane) -> tuple[dict[str, Any], str]:
        return await kp.keys.rotate(await _principal(kp, org), key_id, KeyRotate(grace_seconds=grace_seconds))

    key, secret = run(job)
    if as_json:
        _print_json({"key": key, "secret": secret})
        return
    _show_secret("new secret", secret)


@keys_app.command("delete")
def keys_delete(
    key_id: str,
    force: Annotated[bool, typer.Option(help="Delete even if used in the last 24 hours.")] = False,
    org: Org = "default",
) -> None:
    """Delete a key and its sub-keys permanently."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.keys.delete(await _principal(kp, org), key_id, force=force)

    result = run(job)
    extra = f" (and sub-keys {', '.join(result['subkeys_deleted'])})" if result["subkeys_deleted"] else ""
    typer.echo(f"{key_id} deleted{extra}")


@keys_app.command("recommend")
def keys_recommend(key_id: str, window: Annotated[str, typer.Option(help="24h, 7d …")] = "24h",
                   include_sub_keys: SubKeys = INCLUDE_SUB_KEYS, org: Org = "default",
                   as_json: AsJson = False) -> None:
    """Suggest limits for a key from its real usage over the window, explained."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.recommendations.recommend(await _principal(kp, org), key_id, window, include_sub_keys)

    rec = run(job)
    if as_json:
        _print_json(rec)
        return
    seen = rec["observed"]
    typer.echo(f"requests {seen['requests']}: served {seen['served']}, refused {seen['refused']}, "
               f"failed {seen['failed']}")
    for line in rec["explanation"]:
        typer.echo(line)
    typer.echo("suggested: " + ", ".join(f"{k}={v}" for k, v in rec["suggested_limits"].items() if v is not None))
    typer.echo(f"suggested profile: {rec['suggested_profile']}" if rec["suggested_profile"]
               else "suggested profile: none fits; create one with the suggested limits")

