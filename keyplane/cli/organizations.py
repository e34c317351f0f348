"""``keyplane orgs …``: organizations (tenants)."""

from __future__ import annotations

from typing import Any

import typer

from keyplane.cli.shell import PLAIN_HELP, AsJson, _emit, _print_json, _show_secret, run
from keyplane.services.container import Keyplane
from keyplane.services.principal import cli

orgs_app = typer.Typer(help="Organizations (tenants).", no_args_is_help=True, **PLAIN_HELP)


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

