"""``keyplane sa …``: service accounts, whose ``mcp_sa_`` tokens act on the control plane."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keyplane.cli.shell import PLAIN_HELP, AsJson, Org, _emit, _principal, _print_json, _show_secret, print_table, run
from keyplane.services.container import Keyplane
from keyplane.services.schemas import ServiceAccountCreate

sa_app = typer.Typer(help="Service accounts (mcp_sa_… tokens for the control plane).", no_args_is_help=True,
                      **PLAIN_HELP)


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

