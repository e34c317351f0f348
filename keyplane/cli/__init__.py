"""``keyplane``: serve, and manage keys, service accounts, limit profiles, audit and orgs from a shell.

The CLI acts on the store directly (local access is full access) as ``cli:<os user>``, through
the same service layer as the REST API; every change lands in the audit log under that name.

One module per command group; this one assembles the command tree:

    keyplane serve | connect | migrate      serve.py, connect.py
    keyplane token generate                 serve.py
    keyplane keys …                         keys.py
    keyplane sa …                           service_accounts.py
    keyplane limit-profiles …               limit_profiles.py
    keyplane audit …                        audit.py
    keyplane orgs …                         organizations.py
    keyplane providers …                    providers.py
    keyplane usage …                        usage.py
    keyplane mcp-servers …                  keyplane/cli_mcp_servers.py

What they share (options, ``run``, tables and JSON) is in shell.py, re-exported here for the modules
that import it from ``keyplane.cli``.
"""

from __future__ import annotations

import os

import typer

from keyplane.cli.audit import audit_app
from keyplane.cli.connect import connect
from keyplane.cli.keys import keys_app
from keyplane.cli.limit_profiles import profiles_app
from keyplane.cli.organizations import orgs_app
from keyplane.cli.providers import providers_app
from keyplane.cli.serve import migrate, serve, token_app
from keyplane.cli.service_accounts import sa_app
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
    load_settings,
    print_table,
    run,
)
from keyplane.cli.spend import keys_spend  # noqa: F401  (registers `keyplane keys spend KEY_ID`)
from keyplane.cli.usage import usage_app

app = typer.Typer(help="keyplane: API-key control plane and gateway for MCP servers and LLM APIs.",
                  no_args_is_help=True, pretty_exceptions_enable=False, **PLAIN_HELP)

app.command()(serve)
app.command()(connect)
app.command()(migrate)
app.add_typer(keys_app, name="keys")
app.add_typer(sa_app, name="sa")
app.add_typer(profiles_app, name="limit-profiles")
app.add_typer(audit_app, name="audit")
app.add_typer(orgs_app, name="orgs")
app.add_typer(token_app, name="token")
app.add_typer(providers_app, name="providers")
app.add_typer(usage_app, name="usage")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


# `keyplane mcp-servers …` lives in its own module (one module per command group).
from keyplane.cli_mcp_servers import mcp_servers_app  # noqa: E402

app.add_typer(mcp_servers_app, name="mcp-servers")

__all__ = ["AsJson", "Org", "SubKeys", "_emit", "_fail", "_principal", "_print_json", "_show_secret", "app",
           "connect", "load_settings", "main", "migrate", "print_table", "run", "serve"]
