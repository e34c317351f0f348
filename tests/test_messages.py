"""Messages a newcomer meets (issue 12, item 10): each says what is wrong and what to do."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from keyplane.cli import print_table
from keyplane.domain.money import usd
from tests.conftest import assert_error, create_key
from tests.processes import KEYPLANE, cli


async def test_rotating_a_disabled_key_is_refused_with_the_way_out(
        client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    key, _ = await create_key(client, admin)
    await client.post(f"/api/v1/keys/{key['id']}/disable", headers=admin)
    err = assert_error(await client.post(f"/api/v1/keys/{key['id']}/rotate", headers=admin), 409, "key_not_enabled")
    assert "disabled" in err["message"] and f"keyplane keys enable {key['id']}" in err["message"]
    assert (await client.get(f"/api/v1/keys/{key['id']}", headers=admin)).json()["key"]["masked_key"] == \
        key["masked_key"]
    await client.post(f"/api/v1/keys/{key['id']}/enable", headers=admin)
    assert (await client.post(f"/api/v1/keys/{key['id']}/rotate", headers=admin)).status_code == 200


async def test_a_sub_key_wider_than_its_parent_names_the_parent(
        client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    parent, _ = await create_key(client, admin, scopes=["chats:create"])
    resp = await client.post(f"/api/v1/keys/{parent['id']}/subkeys", headers=admin,
                             json={"name": "child", "scopes": ["chats:create", "embeddings:create"]})
    err = assert_error(resp, 403, "insufficient_scope")
    assert err["message"].startswith(f"The parent key '{parent['id']}' lacks scopes embeddings:create")
    assert "you do not hold" not in err["message"]  # the admin holds them all: it is the parent that lacks them


def test_flags_are_not_labelled_as_taking_a_value() -> None:
    for args in (["serve", "--help"], ["keys", "create", "--help"], ["connect", "--help"]):
        text = subprocess.run([KEYPLANE, *args], capture_output=True, text=True, check=True).stdout
        assert "<bool>" not in text, text
    serve = subprocess.run([KEYPLANE, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--port <int>" in serve and "--demo  " in serve


@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_rotate_of_a_disabled_key_says_how_to_go_on(store_env: dict[str, str], tmp_path: Path) -> None:
    cli(store_env, "orgs", "create", "default")
    made = json.loads(cli(store_env, "keys", "create", "app", "--json").stdout)
    cli(store_env, "keys", "disable", made["key"]["id"])
    refused = cli(store_env, "keys", "rotate", made["key"]["id"], check=False)
    assert refused.returncode == 1 and "mcp_sk_" not in refused.stdout
    assert f"keyplane keys enable {made['key']['id']}" in refused.stderr


@pytest.mark.parametrize(("value", "shown"), [
    (9e-06, "$0.000009"), (3.8e-05, "$0.000038"), (0.0123, "$0.012"), (0.5, "$0.50"), (3.8, "$3.80"),
    (12345.678, "$12,345.68"), (0, "$0.00"), (None, "—"), (-2e-05, "-$0.00002"),
])
def test_money_reads_as_money(value: float | None, shown: str) -> None:
    assert usd(value) == shown


def test_cli_tables_show_costs_as_money(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([{"group": "echo-1", "requests": 3, "cost_usd": 3.8e-05}], ("group", "requests", "cost_usd"))
    out = capsys.readouterr().out
    assert "$0.000038" in out and "e-05" not in out
