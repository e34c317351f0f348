"""`keyplane connect CLIENT`: one builder of every client's setup, checked against each client's format."""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from keyplane.app import KeyplaneApp
from keyplane.config import Settings
from keyplane.domain import scopes as scope_rules
from keyplane.mcp_server.connect import CLIENTS, connect_instructions
from keyplane.services.principal import system
from tests.processes import cli, serve
from tests.test_mcp import mcp_session
from tests.test_quickstart_process import PROCESS_BACKENDS

URL = "https://keys.example.com/mcp"
TOKEN = "mcp_sa_" + "x" * 37


def snippet(client: str, kind: str, token: str | None = TOKEN, **kw: Any) -> str:
    guide = connect_instructions(client, URL, token, **kw)
    return next(s.text for s in guide.snippets if s.kind == kind)


def test_claude_code_command_and_mcp_json() -> None:
    command = snippet("claude-code", "command")
    assert command == f'claude mcp add --transport http keyplane {URL} --header "Authorization: Bearer {TOKEN}"'
    argv = shlex.split(command)
    assert argv[:5] == ["claude", "mcp", "add", "--transport", "http"] and argv[5:7] == ["keyplane", URL]
    entry = json.loads(snippet("claude-code", "json"))["mcpServers"]["keyplane"]
    assert entry == {"type": "http", "url": URL, "headers": {"Authorization": "Bearer ${KEYPLANE_MCP_TOKEN}"}}
    # Without a token the shell fills it in from the environment.
    assert snippet("claude-code", "command", None).endswith('--header "Authorization: Bearer $KEYPLANE_MCP_TOKEN"')


def test_codex_takes_the_token_from_an_environment_variable() -> None:
    guide = connect_instructions("codex", URL, TOKEN)
    commands = [s.text for s in guide.snippets if s.kind == "command"]
    assert commands == [f"export KEYPLANE_MCP_TOKEN={TOKEN}",
                        f"codex mcp add keyplane --url {URL} --bearer-token-env-var KEYPLANE_MCP_TOKEN"]


def test_vscode_add_mcp_json() -> None:
    argv = shlex.split(snippet("vscode", "command"))
    assert argv[:2] == ["code", "--add-mcp"]
    assert json.loads(argv[2]) == {"name": "keyplane", "type": "http", "url": URL,
                                   "headers": {"Authorization": f"Bearer {TOKEN}"}}
    # Placeholder form: valid JSON once the shell has expanded $KEYPLANE_MCP_TOKEN.
    placeholder = shlex.split(snippet("vscode", "command", None).replace("$KEYPLANE_MCP_TOKEN", "T"))
    assert json.loads(placeholder[2])["headers"] == {"Authorization": "Bearer T"}
    file_entry = json.loads(snippet("vscode", "json"))
    assert file_entry["servers"]["keyplane"]["headers"]["Authorization"] == "Bearer ${input:keyplane-token}"
    assert file_entry["inputs"][0]["password"] is True


def test_cursor_deeplink_is_url_encoded_base64_of_the_config() -> None:
    link = snippet("cursor", "link")
    assert link.startswith("cursor://anysphere.cursor-deeplink/mcp/install?name=keyplane&config=")
    raw = link.split("config=", 1)[1]
    assert re.fullmatch(r"[A-Za-z0-9%]+", raw), "base64 padding and + / must be URL-encoded"
    assert json.loads(base64.b64decode(unquote(raw))) == {"url": URL, "headers": {"Authorization": f"Bearer {TOKEN}"}}
    entry = json.loads(snippet("cursor", "json"))["mcpServers"]["keyplane"]
    assert entry == {"url": URL, "headers": {"Authorization": "Bearer ${env:KEYPLANE_MCP_TOKEN}"}}


@pytest.mark.parametrize("client", ["claude-desktop", "chatgpt"])
def test_connector_url_clients_get_the_url_and_the_caveat(client: str) -> None:
    guide = connect_instructions(client, URL, TOKEN, query_token_enabled=False)
    url = next(s.text for s in guide.snippets if s.kind == "url")
    assert parse_qs(urlsplit(url).query) == {"api_key": [TOKEN]} and url.startswith(URL + "?")
    notes = " ".join(guide.notes)
    assert "OAuth" in notes and "KEYPLANE_MCP_QUERY_TOKEN=true" in notes
    assert "KEYPLANE_MCP_QUERY_TOKEN" not in " ".join(connect_instructions(client, URL, TOKEN,
                                                                           query_token_enabled=True).notes)


def test_unknown_client_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown client"):
        connect_instructions("emacs", URL, TOKEN)


def process_env(settings: Settings) -> dict[str, str]:
    env = {"KEYPLANE_HOME": str(settings.home)}
    if not settings.is_sqlite:
        env.update(KEYPLANE_DATABASE_URL=settings.effective_database_url,
                   KEYPLANE_DATABASE_SCHEMA=settings.database_schema or "",
                   KEYPLANE_MASTER_KEY=settings.master_key or "")
    return env


@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
async def test_connect_mint_gives_a_working_narrow_agent_token(app: KeyplaneApp, tmp_path: Path) -> None:
    env = process_env(app.settings)
    async with serve(app) as base:
        out = cli(env, "connect", "claude-code", "--mint", "--url", base, "--json").stdout
        guide = json.loads(out)
        minted = guide["service_account"]
        assert set(minted["scopes"]) == scope_rules.AGENT_DEFAULT_SCOPES
        command = guide["snippets"][0]["text"]
        token = re.search(r"Bearer (mcp_sa_\w+)", command).group(1)  # type: ignore[union-attr]
        assert guide["mcp_url"] == base + "/mcp" and guide["token_included"] is True
        async with mcp_session(base + "/mcp", token, "legacy") as session:
            names = {t.name for t in (await session.list_tools()).tools}
            assert "keyplane_create_virtual_key" in names and "keyplane_audit_events" not in names
            created = await session.call_tool("keyplane_create_virtual_key", {"name": "by-agent"})
            assert not created.is_error

        text = cli(env, "connect", "cursor", "--url", base).stdout
        assert "$KEYPLANE_MCP_TOKEN" in text and "cursor://anysphere.cursor-deeplink/mcp/install" in text
        assert "mcp_sa_" not in text
    # The mint was audited, under the CLI's principal.
    events = await app.kp.audit.list(system(minted_org(app)), action="service_account.create")
    assert events["data"][0]["target"] == minted["id"]
    assert events["data"][0]["principal"].startswith("cli:")
    assert cli(env, "connect", "emacs", check=False).returncode != 0
    assert set(CLIENTS) == {"claude-code", "codex", "vscode", "cursor", "claude-desktop", "chatgpt"}


def minted_org(app: KeyplaneApp) -> str:
    assert app.bootstrap is not None
    return app.bootstrap.org_id
