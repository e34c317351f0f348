"""What every ``keyplane`` command shares: its options, running a job against the store, printing the result.

The CLI acts on the store directly (local access is full access) as ``cli:<os user>``, through
the same service layer as the REST API; every change lands in the audit log under that name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from keyplane.config import Settings, load_or_exit
from keyplane.domain.errors import KeyplaneError
from keyplane.domain.money import usd
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal, cli
from keyplane.store.master_key import MasterKeyMissing
from keyplane.store.reachability import store_problem

# Click's plain help: Typer's rich panels label every flag `<bool>` (`--demo <bool>`), as if it took a value.
PLAIN_HELP: dict[str, Any] = {"rich_markup_mode": None}
T = TypeVar("T")
Org = Annotated[str, typer.Option("--org", envvar="KEYPLANE_ORG", help="Organization name.")]
SubKeys = Annotated[bool, typer.Option("--include-sub-keys/--only-this-key",
                                      help="With a key: count its sub-keys' requests too (they count against "
                                           "its limits).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    """The settings (environment, then flags): a bad one is one line with the fix and exit code 2, no traceback."""
    return load_or_exit(**overrides)


def run(job: Callable[[Keyplane], Awaitable[T]]) -> T:
    """Open the store, migrate it, run ``job``, close it; errors become a message and exit code 1."""
    settings = load_settings()

    async def main() -> T:
        kp = Keyplane(settings)
        try:
            await kp.migrate()
            return await job(kp)
        finally:
            await kp.close()  # publishes what changed, in distributed mode

    try:
        return asyncio.run(main())
    except KeyplaneError as exc:
        _fail(f"{exc.code}: {exc.message}")
    except MasterKeyMissing as exc:
        _fail(f"invalid_request: {exc}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        _fail(f"invalid_request: {problems}")
    except Exception as exc:
        problem = store_problem(settings.effective_database_url, exc)
        if problem is None:
            raise
        _fail(problem)
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


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if column.endswith("_usd") and isinstance(value, int | float):
        return usd(value)  # $0.000038, not 3.8e-05
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
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _show_secret(kind: str, secret: str) -> None:
    typer.echo(f"\n{kind}: {secret}", err=False)
    typer.echo("Store it now: keyplane keeps only its SHA-256 and will not show it again.", err=True)


