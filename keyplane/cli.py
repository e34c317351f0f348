"""``keyplane``: serve, and manage keys, service accounts, limit profiles, audit and orgs from a shell.

The CLI acts on the store directly (local access is full access) as ``cli:<os user>``, through
the same service layer as the REST API; every change lands in the audit log under that name.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from keyplane.config import Settings
from keyplane.domain import tokens
from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.connect import CLIENTS, connect_instructions, mcp_url_for
from keyplane.services.container import Bootstrap, Keyplane
from keyplane.services.principal import Principal, cli
from keyplane.services.schemas import (
    KeyCreate,
    KeyRotate,
    KeyUpdate,
    LimitProfileCreate,
    LimitProfileUpdate,
    ProviderCreate,
    ProviderUpdate,
    ServiceAccountCreate,
)

app = typer.Typer(help="keyplane: API-key control plane and gateway for MCP servers and LLM APIs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Virtual keys (mcp_sk_…).", no_args_is_help=True)
sa_app = typer.Typer(help="Service accounts (mcp_sa_… tokens for the control plane).", no_args_is_help=True)
profiles_app = typer.Typer(help="Limit profiles.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
orgs_app = typer.Typer(help="Organizations (tenants).", no_args_is_help=True)
token_app = typer.Typer(help="Tokens.", no_args_is_help=True)
providers_app = typer.Typer(help="Upstream providers (OpenAI-compatible).", no_args_is_help=True)
usage_app = typer.Typer(help="Usage of the data plane.", invoke_without_command=True)
app.add_typer(keys_app, name="keys")
app.add_typer(sa_app, name="sa")
app.add_typer(profiles_app, name="limit-profiles")
app.add_typer(audit_app, name="audit")
app.add_typer(orgs_app, name="orgs")
app.add_typer(token_app, name="token")
app.add_typer(providers_app, name="providers")
app.add_typer(usage_app, name="usage")

T = TypeVar("T")
Org = Annotated[str, typer.Option("--org", envvar="KEYPLANE_ORG", help="Organization name.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(job: Callable[[Keyplane], Awaitable[T]]) -> T:
    """Open the store, migrate it, run ``job``, close it; errors become a message and exit code 1."""

    async def main() -> T:
        kp = Keyplane(Settings())
        try:
            await kp.migrate()
            return await job(kp)
        finally:
            await kp.close()  # publishes what changed, in distributed mode

    try:
        return asyncio.run(main())
    except KeyplaneError as exc:
        _fail(f"{exc.code}: {exc.message}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        _fail(f"invalid_request: {problems}")
    raise AssertionError("unreachable")


async def _principal(kp: Keyplane, org: str) -> Principal:
    org_row = await kp.organizations.by_name(org)
    if org_row is None:
        raise KeyplaneError(
            404, "not_found", f"No organization '{org}': `keyplane serve` creates 'default' on first start"
        )
    return cli(org_row["id"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=_jsonable))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _emit(value: Any, as_json: bool, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """``--json``: the whole value; otherwise its rows as a table."""
    if as_json:
        _print_json(value)
    else:
        print_table(rows, columns)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _show_secret(kind: str, secret: str) -> None:
    typer.echo(f"\n{kind}: {secret}", err=False)
    typer.echo("Store it now: keyplane keeps only its SHA-256 and will not show it again.", err=True)


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


# -- serve ---------------------------------------------------------------------------------------

def _banner(settings: Settings) -> Callable[[Bootstrap], None]:
    def show(boot: Bootstrap) -> None:
        url = settings.base_url
        lines = [
            "",
            f"keyplane is running at {url}",
            f"  dashboard:    {url}/ui",
            f"  API docs:     {url}/docs",
            f"  MCP server:   {url}/mcp   (`keyplane connect claude-code --mint` prints the setup)",
            f"  verify API:   {url}/api/v1/keys/verify",
            f"  store:        {'SQLite at ' + str(settings.home) if settings.is_sqlite else 'PostgreSQL'}"
            + (f", limits shared in Redis, {settings.workers} worker(s)" if settings.redis_url else ""),
        ]
        if settings.demo:
            lines.append("  demo:         provider 'demo' serves model echo-1 (a local echo, no account needed)")
        if boot.created and boot.admin_token:
            if settings.admin_token:
                lines.append("  admin token:  taken from KEYPLANE_ADMIN_TOKEN")
            else:
                lines += [
                    f"  admin token:  {boot.admin_token}",
                    "                (shown once: keyplane keeps only its hash. Save it now.)",
                ]
        else:
            lines.append("  admin token:  printed on first start; mint another with `keyplane sa create`")
        lines.append("")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    return show


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (KEYPLANE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (KEYPLANE_PORT).")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Register a built-in local echo provider (model echo-1) "
                                                     "to try the gateway with no provider account.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes on this port (KEYPLANE_WORKERS); more "
                                                            "than one needs KEYPLANE_REDIS_URL.")] = None,
) -> None:
    """Run keyplane: migrations apply on start; first start creates the admin token and prints it once."""
    import uvicorn

    from keyplane.app import KeyplaneApp
    from keyplane.logs import configure_logging

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if demo:
        overrides["demo"] = True
    if workers is not None:
        overrides["workers"] = workers
    settings = Settings(**overrides)
    if settings.admin_token and not tokens.is_well_formed(settings.admin_token, tokens.SERVICE_ACCOUNT_PREFIX):
        _fail("invalid_request: KEYPLANE_ADMIN_TOKEN must be a well-formed mcp_sa_ token "
              "(`keyplane token generate` prints one)")
    if settings.workers > 1 and not settings.redis_url:
        _fail("invalid_request: --workers > 1 needs KEYPLANE_REDIS_URL, so that rate limits, budgets and "
              "revocations are shared by every process (see docs/operations.md)")
    configure_logging(settings.log_level)
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "access_log": False, "log_config": None,
                              "lifespan": "on", "server_header": False}
    if settings.workers == 1:
        application = KeyplaneApp(settings, on_ready=_banner(settings), owns_process=True)
        uvicorn.run(application, **common)
        return
    # Several processes on one port: migrate and bootstrap once here (and print the banner once), then
    # let uvicorn fork workers that each build the app from the same settings (passed by environment).
    async def prepare(kp: Keyplane) -> Bootstrap:
        kp.secret_box()  # creates the master key file once (SQLite), or checks KEYPLANE_MASTER_KEY
        return await kp.bootstrap()

    _banner(settings)(run(prepare))
    for name, value in overrides.items():
        os.environ[f"KEYPLANE_{name.upper()}"] = str(value)
    uvicorn.run("keyplane.app:create_app", factory=True, workers=settings.workers, **common)


@app.command()
def connect(
    client: Annotated[str, typer.Argument(help=f"One of: {', '.join(CLIENTS)}.")],
    mint: Annotated[bool, typer.Option("--mint", help="Mint a narrowly scoped agent token (audited) and fill it "
                                                      "in; otherwise the setup reads $KEYPLANE_MCP_TOKEN.")] = False,
    url: Annotated[str | None, typer.Option(help="keyplane's URL as the agent reaches it "
                                                 "(default KEYPLANE_PUBLIC_URL or host:port).")] = None,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Print a ready-to-run setup that connects a coding agent to keyplane's MCP server at /mcp."""
    if client not in CLIENTS:
        _fail(f"invalid_request: unknown client '{client}': one of {', '.join(CLIENTS)}")
    settings = Settings()
    token: str | None = None
    minted: dict[str, Any] | None = None
    if mint:

        async def job(kp: Keyplane) -> tuple[dict[str, Any], str]:
            return await kp.service_accounts.mint_agent_token(await _principal(kp, org), CLIENTS[client])

        minted, token = run(job)
    guide = connect_instructions(client, mcp_url_for(url or settings.base_url), token,
                                 query_token_enabled=settings.mcp_query_token)
    if as_json:
        _print_json({**guide.to_dict(), "service_account": minted})
        return
    typer.echo(f"# Connect {guide.title} to keyplane's MCP server at {guide.mcp_url}")
    if minted is not None:
        typer.echo(f"# Minted service account {minted['id']} ({', '.join(minted['scopes'])}).")
        typer.echo("# The token below is shown once: keyplane keeps only its SHA-256.")
    else:
        typer.echo(f"# The token is read from ${guide.token_env_var}: `keyplane connect {client} --mint` mints one.")
    for snippet in guide.snippets:
        typer.echo(f"\n# {snippet.label}:\n{snippet.text}")
    for note in guide.notes:
        typer.echo(f"\n# Note: {note}")


@app.command()
def migrate() -> None:
    """Apply database migrations (serve does this on start)."""

    async def job(kp: Keyplane) -> None:
        return None

    run(job)
    typer.echo("migrations applied")


# -- tokens --------------------------------------------------------------------------------------

@token_app.command("generate")
def token_generate(
    kind: Annotated[str, typer.Option(help="sa (service account, for KEYPLANE_ADMIN_TOKEN) or sk (virtual key)")]
    = "sa",
) -> None:
    """Print a fresh well-formed token (nothing is stored)."""
    prefixes = {"sa": tokens.SERVICE_ACCOUNT_PREFIX, "sk": tokens.VIRTUAL_KEY_PREFIX}
    if kind not in prefixes:
        _fail("invalid_request: --kind is 'sa' or 'sk'")
    typer.echo(tokens.generate(prefixes[kind]))


# -- keys ----------------------------------------------------------------------------------------

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
                   org: Org = "default", as_json: AsJson = False) -> None:
    """Suggest limits for a key from its real usage over the window, explained."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.recommendations.recommend(await _principal(kp, org), key_id, window)

    rec = run(job)
    if as_json:
        _print_json(rec)
        return
    for line in rec["explanation"]:
        typer.echo(line)
    typer.echo("suggested: " + ", ".join(f"{k}={v}" for k, v in rec["suggested_limits"].items() if v is not None))


# -- service accounts ----------------------------------------------------------------------------

@sa_app.command("create")
def sa_create(
    name: str,
    scope: Annotated[list[str], typer.Option("--scope", "-s", help="Scope (repeat); 'admin' is all.")],
    description: Annotated[str | None, typer.Option()] = None,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Create a service account; its token is printed once."""

    async def job(kp: Keyplane) -> tuple[dict[str, Any], str]:
        body = ServiceAccountCreate(name=name, scopes=scope, description=description)
        return await kp.service_accounts.create(await _principal(kp, org), body)

    sa, token = run(job)
    if as_json:
        _print_json({"service_account": sa, "token": token})
        return
    print_table([sa], ("id", "name", "masked_token", "scopes"))
    _show_secret("token", token)


@sa_app.command("list")
def sa_list(include_revoked: bool = False, org: Org = "default", as_json: AsJson = False) -> None:
    """List service accounts."""

    async def job(kp: Keyplane) -> list[dict[str, Any]]:
        return await kp.service_accounts.list(await _principal(kp, org), include_revoked=include_revoked)

    rows = run(job)
    _emit(rows, as_json, rows, ("id", "name", "masked_token", "status", "scopes", "created_at"))


@sa_app.command("revoke")
def sa_revoke(sa_id: str, org: Org = "default") -> None:
    """Revoke a service account's token at once."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.service_accounts.revoke(await _principal(kp, org), sa_id)

    sa = run(job)
    typer.echo(f"{sa['id']} is {sa['status']}")


# -- limit profiles ------------------------------------------------------------------------------

PROFILE_COLUMNS = ("name", "requests_per_minute", "tokens_per_minute", "cost_per_day_usd", "budget_per_month_usd")
RPM = Annotated[int | None, typer.Option(help="Requests per minute.")]
TPM = Annotated[int | None, typer.Option(help="Tokens per minute.")]
CPD = Annotated[float | None, typer.Option(help="USD per day.")]
BPM = Annotated[float | None, typer.Option(help="USD per calendar month.")]


@profiles_app.command("list")
def profiles_list(org: Org = "default", as_json: AsJson = False) -> None:
    """List limit profiles."""

    async def job(kp: Keyplane) -> list[dict[str, Any]]:
        return await kp.limit_profiles.list(await _principal(kp, org))

    rows = run(job)
    _emit(rows, as_json, rows, PROFILE_COLUMNS)


def _limits(rpm: int | None, tpm: int | None, cpd: float | None, bpm: float | None) -> dict[str, Any]:
    values = {"requests_per_minute": rpm, "tokens_per_minute": tpm, "cost_per_day_usd": cpd,
              "budget_per_month_usd": bpm}
    return {k: v for k, v in values.items() if v is not None}


@profiles_app.command("create")
def profiles_create(name: str, rpm: RPM = None, tpm: TPM = None, cost_per_day: CPD = None,
                    budget_per_month: BPM = None, org: Org = "default") -> None:
    """Create a limit profile."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        body = LimitProfileCreate.model_validate({"name": name, **_limits(rpm, tpm, cost_per_day, budget_per_month)})
        return await kp.limit_profiles.create(await _principal(kp, org), body)

    print_table([run(job)], PROFILE_COLUMNS)


@profiles_app.command("update")
def profiles_update(name: str, rpm: RPM = None, tpm: TPM = None, cost_per_day: CPD = None,
                    budget_per_month: BPM = None, org: Org = "default") -> None:
    """Change a limit profile's limits."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        body = LimitProfileUpdate.model_validate(_limits(rpm, tpm, cost_per_day, budget_per_month))
        return await kp.limit_profiles.update(await _principal(kp, org), name, body)

    print_table([run(job)], PROFILE_COLUMNS)


@profiles_app.command("delete")
def profiles_delete(name: str, org: Org = "default") -> None:
    """Delete a limit profile no key uses."""

    async def job(kp: Keyplane) -> None:
        await kp.limit_profiles.delete(await _principal(kp, org), name)

    run(job)
    typer.echo(f"{name} deleted")


# -- audit ---------------------------------------------------------------------------------------

@audit_app.command("list")
def audit_list(
    action: Annotated[str | None, typer.Option()] = None,
    principal: Annotated[str | None, typer.Option()] = None,
    target: Annotated[str | None, typer.Option()] = None,
    since: Annotated[str | None, typer.Option(help="24h, 7d or RFC 3339.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Show recent audit events (newest first)."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.audit.list(await _principal(kp, org), principal_filter=principal, action=action,
                                   target=target, since=since, limit=limit)

    page = run(job)
    _emit(page, as_json, page["data"], ("seq", "time", "principal", "action", "target"))


@audit_app.command("activity")
def audit_activity(
    days: Annotated[int, typer.Option(min=1, max=366, help="How many days back, today included.")] = 14,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Changes recorded per day (UTC) as bars, and the most frequent actions."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.audit.activity(await _principal(kp, org), days=days)

    activity = run(job)
    if as_json:
        _print_json(activity)
        return
    peak = max([d["events"] for d in activity["days"]] + [1])
    for d in activity["days"]:
        typer.echo(f"{d['date']}  {d['events']:>6}  {'█' * round(40 * d['events'] / peak)}")
    if activity["top_actions"]:
        typer.echo("\nmost frequent actions:")
        for a in activity["top_actions"]:
            typer.echo(f"  {a['events']:>6}  {a['action']}")


@audit_app.command("verify")
def audit_verify(org: Org = "default") -> None:
    """Recompute the hash chain; exit 1 and name the first bad entry if it was edited, deleted or reordered."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return (await kp.audit.verify(await _principal(kp, org))).as_dict()

    verdict = run(job)
    if verdict["ok"]:
        typer.echo(f"audit chain OK: {verdict['entries']} entries verified (org {org})")
        return
    typer.echo(
        f"audit chain BROKEN at entry {verdict['first_broken_seq']}: {verdict['reason']} "
        f"(verified up to entry {verdict['verified_up_to']})",
        err=True,
    )
    raise typer.Exit(1)


# -- providers -----------------------------------------------------------------------------------

def _models(specs: list[str]) -> list[dict[str, Any]]:
    """``name`` or ``name=input_per_mtok/output_per_mtok`` (USD per million tokens)."""
    out = []
    for spec in specs:
        name, _, prices = spec.partition("=")
        entry: dict[str, Any] = {"name": name}
        if prices:
            inp, _, outp = prices.partition("/")
            try:
                entry["input_per_mtok"] = float(inp)
                entry["output_per_mtok"] = float(outp or 0)
            except ValueError:
                _fail(f"invalid_request: --model takes name or name=input/output prices, not '{spec}'")
        out.append(entry)
    return out


def _provider_secret(api_key_env: str | None) -> str | None:
    if api_key_env is None:
        return None
    value = os.environ.get(api_key_env)
    if not value:
        _fail(f"invalid_request: environment variable {api_key_env} is empty or unset")
    return value


PROVIDER_COLUMNS = ("name", "kind", "base_url", "api_key", "models", "timeout_seconds")


def _provider_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "models": [m["name"] for m in r["models"]]} for r in rows]


@providers_app.command("add")
def providers_add(
    name: str,
    base_url: Annotated[str, typer.Option(help="e.g. https://api.openai.com/v1")],
    model: Annotated[list[str], typer.Option("--model", "-m", help="name or name=IN/OUT USD per 1M tokens (repeat)")],
    api_key_env: Annotated[str | None, typer.Option(help="Read the provider's secret from this env variable "
                                                         "(never from the command line).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the upstream.")] = 60.0,
    org: Org = "default",
) -> None:
    """Register an OpenAI-compatible upstream; its secret is encrypted at rest and never shown again."""
    body: dict[str, Any] = {"name": name, "base_url": base_url, "models": _models(model), "timeout_seconds": timeout}
    secret = _provider_secret(api_key_env)
    if secret:
        body["api_key"] = secret

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.providers.create(await _principal(kp, org), ProviderCreate.model_validate(body))

    print_table(_provider_rows([run(job)]), PROVIDER_COLUMNS)


@providers_app.command("list")
def providers_list(org: Org = "default", as_json: AsJson = False) -> None:
    """List providers (secrets masked)."""

    async def job(kp: Keyplane) -> list[dict[str, Any]]:
        return await kp.providers.list(await _principal(kp, org))

    rows = run(job)
    _emit(rows, as_json, _provider_rows(rows), PROVIDER_COLUMNS)


@providers_app.command("update")
def providers_update(
    name: str,
    base_url: Annotated[str | None, typer.Option()] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Replace the model list (repeat).")]
    = None,
    api_key_env: Annotated[str | None, typer.Option(help="Rotate: read the new secret from this env variable.")]
    = None,
    timeout: Annotated[float | None, typer.Option()] = None,
    org: Org = "default",
) -> None:
    """Change a provider: base URL, models and prices, timeout, or rotate its secret."""
    changes: dict[str, Any] = {}
    if base_url is not None:
        changes["base_url"] = base_url
    if model:
        changes["models"] = _models(model)
    if timeout is not None:
        changes["timeout_seconds"] = timeout
    secret = _provider_secret(api_key_env)
    if secret:
        changes["api_key"] = secret

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.providers.update(await _principal(kp, org), name, ProviderUpdate.model_validate(changes))

    print_table(_provider_rows([run(job)]), PROVIDER_COLUMNS)


@providers_app.command("delete")
def providers_delete(name: str, org: Org = "default") -> None:
    """Remove a provider; its models stop being served at once."""

    async def job(kp: Keyplane) -> None:
        await kp.providers.delete(await _principal(kp, org), name)

    run(job)
    typer.echo(f"{name} deleted")


# -- usage ---------------------------------------------------------------------------------------

USAGE_COLUMNS = ("group", "requests", "errors", "error_rate", "input_tokens", "output_tokens", "total_tokens",
                 "cost_usd", "p50_ms", "p95_ms")


@usage_app.callback()
def usage(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="24h, 7d, 30m or RFC 3339.")] = "24h",
    group_by: Annotated[str, typer.Option(help="provider, model, cost_center, environment, key, endpoint, "
                                               "hour or day")] = "model",
    key_id: Annotated[str | None, typer.Option("--key", help="Only this key.")] = None,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Requests, errors, tokens, cost and latency, grouped (the same figures as /api/v1/usage/summary)."""
    if ctx.invoked_subcommand is not None:
        return

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.usage.summary(await _principal(kp, org), since=since, group_by=group_by, key_id=key_id)

    summary = run(job)
    _emit(summary, as_json, summary["data"], USAGE_COLUMNS)


@usage_app.command("events")
def usage_events(
    since: Annotated[str | None, typer.Option()] = None,
    key_id: Annotated[str | None, typer.Option("--key")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """The most recent usage events."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.usage.events(await _principal(kp, org), since=since, key_id=key_id, limit=limit)

    page = run(job)
    if as_json:
        _print_json(page)
    else:
        print_table(page["data"], ("time", "key_id", "endpoint", "model", "status", "code", "input_tokens",
                                   "output_tokens", "cost_usd", "latency_ms"))


# -- organizations -------------------------------------------------------------------------------

@orgs_app.command("create")
def orgs_create(name: str, as_json: AsJson = False) -> None:
    """Create an organization with its built-in limit profiles and an admin token (printed once)."""

    async def job(kp: Keyplane) -> Any:
        actor = cli("-").id
        return await kp.organizations.create(name, actor=actor)

    new = run(job)
    if as_json:
        _print_json({"organization": new.org, "service_account": new.admin, "token": new.admin_token})
        return
    typer.echo(f"organization {new.org['name']} ({new.org['id']}) created")
    _show_secret("admin token", new.admin_token)


@orgs_app.command("list")
def orgs_list(as_json: AsJson = False) -> None:
    """List organizations."""

    async def job(kp: Keyplane) -> list[dict[str, Any]]:
        return await kp.organizations.list()

    rows = run(job)
    _emit(rows, as_json, rows, ("id", "name", "created_at", "audit_entries"))


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
