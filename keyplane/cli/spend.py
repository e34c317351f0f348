"""`keyplane keys spend KEY_ID`: a key's spend windows now, settled vs reserved (services/spend_status.py)."""

from __future__ import annotations

from typing import Any

import typer

from keyplane.cli.keys import keys_app
from keyplane.cli.shell import AsJson, Org, _principal, _print_json, print_table, run
from keyplane.domain.money import usd
from keyplane.services.container import Keyplane

COLUMNS = ("limit", "value", "settled", "reserved", "remaining", "resets_at")
EMBEDDED_NOTE = ("embedded mode: reservations and this minute's tokens live in the serving process's memory "
                 "(GET /api/v1/keys/{id}/spend on the server shows them); settled cost here is what the store "
                 "has recorded so far.")


def _amount(window: dict[str, Any], field: str) -> str:
    value = window[field]
    if value is None:
        return "no limit" if field == "value" else "-"
    return f"{value:,.0f}" if window["limit"] == "tokens_per_minute" else usd(value)


def spend_rows(status: dict[str, Any]) -> list[dict[str, str]]:
    """The windows as printable rows: tokens as counts, costs in dollars."""
    return [{"limit": w["limit"], **{f: _amount(w, f) for f in ("value", "settled", "reserved", "remaining")},
             "resets_at": w["resets_at"]} for w in status["windows"]]


@keys_app.command("spend")
def keys_spend(key_id: str, org: Org = "default", as_json: AsJson = False) -> None:
    """A key's spend in its current windows (tokens this minute, cost today, budget this month): what answers
    have settled, what requests in flight hold reserved, what is left. Its sub-keys' spend counts in it."""
    embedded: list[bool] = []

    async def job(kp: Keyplane) -> dict[str, Any]:
        embedded.append(kp.shared is None)
        return await kp.spend_status.current(await _principal(kp, org), key_id)

    status = run(job)
    if as_json:
        _print_json(status)
        return
    print_table(spend_rows(status), COLUMNS)
    if embedded and embedded[0]:
        typer.echo(EMBEDDED_NOTE.replace("{id}", key_id), err=True)
