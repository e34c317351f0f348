"""``keyplane usage``: the data plane's requests, tokens, cost and latency, and its recent events."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keyplane.cli.shell import PLAIN_HELP, AsJson, Org, SubKeys, _emit, _principal, _print_json, print_table, run
from keyplane.services.container import Keyplane
from keyplane.services.traffic import INCLUDE_SUB_KEYS

usage_app = typer.Typer(help="Usage of the data plane.", invoke_without_command=True, **PLAIN_HELP)

USAGE_COLUMNS = ("group", "requests", "served", "refused", "failed", "error_rate", "input_tokens", "output_tokens",
                 "total_tokens", "cost_usd", "p50_ms", "p95_ms")


@usage_app.callback()
def usage(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="24h, 7d, 30m or RFC 3339.")] = "24h",
    group_by: Annotated[str, typer.Option(help="provider, model, cost_center, environment, key, endpoint, "
                                               "mcp_server, tool, status_class, hour or day")] = "model",
    key_id: Annotated[str | None, typer.Option("--key", help="Only this key's traffic.")] = None,
    include_sub_keys: SubKeys = INCLUDE_SUB_KEYS,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Requests (served + refused + failed), tokens, cost and latency, grouped (the same figures as
    /api/v1/usage/summary)."""
    if ctx.invoked_subcommand is not None:
        return

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.usage.summary(await _principal(kp, org), since=since, group_by=group_by, key_id=key_id,
                                      include_sub_keys=include_sub_keys)

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

