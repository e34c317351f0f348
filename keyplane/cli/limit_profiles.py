"""``keyplane limit-profiles …``: named sets of limits that keys share."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keyplane.cli.shell import PLAIN_HELP, AsJson, Org, _emit, _principal, print_table, run
from keyplane.services.container import Keyplane
from keyplane.services.schemas import LimitProfileCreate, LimitProfileUpdate

profiles_app = typer.Typer(help="Limit profiles.", no_args_is_help=True, **PLAIN_HELP)

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

