"""``keyplane serve``, ``keyplane migrate`` and ``keyplane token generate``: running keyplane and setting it up."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from keyplane.cli.shell import PLAIN_HELP, _fail, load_settings, run
from keyplane.config import Settings
from keyplane.domain import tokens
from keyplane.services.container import Bootstrap, Keyplane

token_app = typer.Typer(help="Tokens.", no_args_is_help=True, **PLAIN_HELP)


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


def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (KEYPLANE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port, 1-65535 (KEYPLANE_PORT; default 8080).")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Register a built-in local echo provider (model echo-1) "
                                                     "to try the gateway with no provider account.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes on this port (KEYPLANE_WORKERS); more "
                                                            "than one needs KEYPLANE_REDIS_URL.")] = None,
) -> None:
    """Run keyplane: migrations apply on start; first start creates the admin token and prints it once."""
    import uvicorn

    from keyplane.app import KeyplaneApp
    from keyplane.http_protocol import http_protocol
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
    settings = load_settings(**overrides)
    if settings.admin_token and not tokens.is_well_formed(settings.admin_token, tokens.SERVICE_ACCOUNT_PREFIX):
        _fail("invalid_request: KEYPLANE_ADMIN_TOKEN must be a well-formed mcp_sa_ token "
              "(`keyplane token generate` prints one)")
    if settings.workers > 1 and not settings.redis_url:
        _fail("invalid_request: --workers > 1 needs KEYPLANE_REDIS_URL, so that rate limits, budgets and "
              "revocations are shared by every process (see docs/operations.md)")
    configure_logging(settings.log_level)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from any loopback peer and rewrite the
    # client before keyplane sees it. keyplane's own resolver (KEYPLANE_TRUSTED_PROXIES) alone decides who calls.
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "access_log": False, "log_config": None,
                              "lifespan": "on", "server_header": False, "proxy_headers": False}
    common["http"] = http_protocol()  # malformed HTTP is answered in the error shape too
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
    # A worker answers uvicorn's health check only once it has imported everything: on a busy machine that
    # takes longer than uvicorn's 5 s default, and a slow-starting worker would be killed and restarted forever.
    uvicorn.run("keyplane.app:create_app", factory=True, workers=settings.workers, timeout_worker_healthcheck=60,
                **common)


def migrate() -> None:
    """Apply database migrations (serve does this on start)."""

    async def job(kp: Keyplane) -> None:
        return None

    run(job)
    typer.echo("migrations applied")

# -- tokens --------------------------------------------------------------------------------------


@token_app.command("generate")
def token_generate(
    kind: Annotated[str, typer.Option(help="sa (service account, for KEYPLANE_ADMIN_TOKEN), sk (virtual key) or "
                                           "master (a KEYPLANE_MASTER_KEY)")] = "sa",
) -> None:
    """Print a fresh well-formed token or master key (nothing is stored)."""
    from keyplane.domain.secrets_box import new_master_key

    prefixes = {"sa": tokens.SERVICE_ACCOUNT_PREFIX, "sk": tokens.VIRTUAL_KEY_PREFIX}
    if kind == "master":
        typer.echo(new_master_key())
        return
    if kind not in prefixes:
        _fail("invalid_request: --kind is 'sa', 'sk' or 'master'")
    typer.echo(tokens.generate(prefixes[kind]))

