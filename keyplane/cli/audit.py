"""``keyplane audit …``: the hash-chained audit log (list, activity, verify)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from keyplane.cli.shell import PLAIN_HELP, AsJson, Org, _emit, _principal, _print_json, run
from keyplane.services.container import Keyplane

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True, **PLAIN_HELP)


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
def audit_verify(
    checkpoints: Annotated[Path | None, typer.Option(
        "--checkpoints", help="Directory of signed checkpoints (default: the configured one, "
                              "KEYPLANE_AUDIT_CHECKPOINT_DIR).", file_okay=False)] = None,
    full: Annotated[bool, typer.Option("--full", help="Verify from the first entry and hold every checkpoint "
                                                       "to it (default: from the newest checkpoint).")] = False,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Verify the keyed hash chain against the signed checkpoints; exit 1 naming the first bad entry and
    what is wrong (edited, rewritten or forged without the key, deleted, truncated)."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return (await kp.audit.verify(await _principal(kp, org), full=full, checkpoints=checkpoints)).as_dict()

    verdict = run(job)
    if as_json:
        _print_json(verdict)
    elif verdict["ok"]:
        start = "from the first entry" if verdict["from_seq"] == 0 else f"after checkpoint {verdict['from_seq']}"
        typer.echo(f"audit chain OK: {verdict['entries']} entries verified {start}, up to entry "
                   f"{verdict['verified_up_to']}; {verdict['checkpoints']} signed checkpoint(s) agree (org {org})")
        if verdict["checkpoints"] == 0:
            typer.echo("note: no signed checkpoints found, so a deleted tail cannot be told from a short chain; "
                       "pass --checkpoints DIR (a copy kept off the database host)", err=True)
    else:
        typer.echo(
            f"audit chain BROKEN at entry {verdict['first_broken_seq']} [{verdict['problem']}]: {verdict['reason']} "
            f"(verified up to entry {verdict['verified_up_to']})",
            err=True,
        )
    if not verdict["ok"]:
        raise typer.Exit(1)

