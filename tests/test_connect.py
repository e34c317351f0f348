"""`keyplane connect CLIENT`: one builder of every client's setup, checked against each client's format."""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from keyplane.app import KeyplaneApp
from keyplane.config import Settings
from keyplane.domain import scopes as scope_rules
from keyplane.mcp_server.connect import CLIENTS, connect_instructions
from keyplane.services.principal import system
from tests.processes import Server, cli, serve
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


def test_vscode_mcp_json_prompts_for_the_token() -> None:
    """VS Code's documented mcp.json: "servers" plus "inputs"; a promptString input needs type, id and password."""
    for token in (None, TOKEN):
        entry = json.loads(snippet("vscode", "json", token))
        assert set(entry) == {"inputs", "servers"}
        assert entry["inputs"] == [{"type": "promptString", "id": "keyplane-token",
                                    "description": "keyplane agent token", "password": True}]
        assert entry["servers"] == {"keyplane": {"type": "http", "url": URL,
                                                 "headers": {"Authorization": "Bearer ${input:keyplane-token}"}}}
    # Without a minted token there is nothing for a shell to expand into VS Code's settings: no command at all.
    guide = connect_instructions("vscode", URL, None)
    assert [s.kind for s in guide.snippets] == ["json"]
    assert "$KEYPLANE_MCP_TOKEN" not in json.dumps(guide.to_dict())


def test_vscode_add_mcp_with_a_minted_token_says_where_it_lands() -> None:
    guide = connect_instructions("vscode", URL, TOKEN)
    command = next(s.text for s in guide.snippets if s.kind == "command")
    argv = shlex.split(command)
    assert argv[:2] == ["code", "--add-mcp"]
    assert json.loads(argv[2]) == {"name": "keyplane", "type": "http", "url": URL,
                                   "headers": {"Authorization": f"Bearer {TOKEN}"}}
    assert "plain text" in " ".join(guide.notes)


def shell_argv(shell: str, command: str, **env: str) -> list[str]:
    """The argv ``command`` gives its program in a real ``shell`` (the program replaced by a printer)."""
    program = command.split()[0]
    script = f'{program}() {{ for a in "$@"; do printf "%s\\0" "$a"; done; }}\n{command}'
    out = subprocess.run([shell, "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout
    return [program, *out.split("\0")[:-1]]


@pytest.mark.parametrize("shell", [s for s in ("bash", "zsh", "sh") if shutil.which(s)])
def test_printed_commands_quote_right_in_the_shells_the_docs_name(shell: str) -> None:
    # Claude Code: the shell fills the variable in, and the header stays one argument.
    argv = shell_argv(shell, snippet("claude-code", "command", None), KEYPLANE_MCP_TOKEN=TOKEN)
    assert argv[1:] == ["mcp", "add", "--transport", "http", "keyplane", URL, "--header",
                        f"Authorization: Bearer {TOKEN}"]
    assert shell_argv(shell, snippet("claude-code", "command"))[-1] == f"Authorization: Bearer {TOKEN}"
    # Codex reads the variable the export sets.
    export, add = [s.text for s in connect_instructions("codex", URL, TOKEN).snippets]
    out = subprocess.run([shell, "-c", f'{export}\nprintf %s "$KEYPLANE_MCP_TOKEN"'], capture_output=True,
                         text=True, check=True).stdout
    assert out == TOKEN
    assert shell_argv(shell, add)[1:] == ["mcp", "add", "keyplane", "--url", URL, "--bearer-token-env-var",
                                          "KEYPLANE_MCP_TOKEN"]
    # VS Code's one-liner: the JSON survives the shell intact.
    vscode = next(s.text for s in connect_instructions("vscode", URL, TOKEN).snippets if s.kind == "command")
    assert json.loads(shell_argv(shell, vscode)[2])["headers"]["Authorization"] == f"Bearer {TOKEN}"


def test_cursor_deeplink_is_url_encoded_base64_of_the_config() -> None:
    link = snippet("cursor", "link")
    assert link.startswith("cursor://anysphere.cursor-deeplink/mcp/install?name=keyplane&config=")
    raw = link.split("config=", 1)[1]
    assert re.fullmatch(r"[A-Za-z0-9%]+", raw), "base64 padding and + / must be URL-encoded"
    assert json.loads(base64.b64decode(unquote(raw))) == {"url": URL, "headers": {"Authorization": f"Bearer {TOKEN}"}}
    entry = json.loads(snippet("cursor", "json"))["mcpServers"]["keyplane"]
    assert entry == {"url": URL, "headers": {"Authorization": "Bearer ${env:KEYPLANE_MCP_TOKEN}"}}


CONNECTORS = ["claude-desktop", "chatgpt"]


@pytest.mark.parametrize("client", CONNECTORS)
@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/mcp", "http://localhost:9000/mcp", "https://127.0.0.1/mcp",
                                 "https://10.1.2.3/mcp", "https://keyplane.local/mcp", "http://keys.example.com/mcp"])
def test_connector_clients_refuse_what_their_vendors_cloud_cannot_reach(client: str, url: str) -> None:
    guide = connect_instructions(client, url, TOKEN, query_token_enabled=True)
    assert not guide.ready and guide.snippets == [] and not guide.token_included
    notes = " ".join(guide.notes)
    assert "public HTTPS URL" in notes and "KEYPLANE_PUBLIC_URL=https://" in notes and "cloud" in notes


@pytest.mark.parametrize("client", CONNECTORS)
def test_connector_clients_need_query_tokens_switched_on_and_say_the_trade_off(client: str) -> None:
    guide = connect_instructions(client, URL, TOKEN, query_token_enabled=False)
    assert not guide.ready and guide.snippets == []
    notes = " ".join(guide.notes)
    assert "KEYPLANE_MCP_QUERY_TOKEN=true" in notes and "OAuth" in notes and "logs" in notes


@pytest.mark.parametrize("client", CONNECTORS)
def test_connector_url_when_it_can_work(client: str) -> None:
    guide = connect_instructions(client, URL, TOKEN, query_token_enabled=True)
    assert guide.ready and guide.token_included
    (url_snippet,) = guide.snippets
    assert url_snippet.kind == "url" and parse_qs(urlsplit(url_snippet.text).query) == {"api_key": [TOKEN]}
    assert "anyone holding the URL holds the token" in " ".join(guide.notes)
    # Without a token: a literal placeholder, never URL-encoded.
    text = snippet(client, "url", None, query_token_enabled=True)
    assert text == URL + "?api_key=<token>" and "%3C" not in text


def test_each_connector_ui_path() -> None:
    label = next(s.label for s in connect_instructions("chatgpt", URL, TOKEN, query_token_enabled=True).snippets)
    assert "Settings → Connectors → Advanced → turn on Developer mode" in label and "→ Create" in label
    desktop = next(s.label for s in connect_instructions("claude-desktop", URL, TOKEN,
                                                         query_token_enabled=True).snippets)
    assert "Settings → Connectors → Add custom connector" in desktop


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


@pytest.mark.parametrize("backend", ["sqlite"])
def test_connect_assumes_the_url_the_server_printed(store_env: dict[str, str], tmp_path: Path) -> None:
    server = Server(store_env, tmp_path)  # on a random port, given as --port: not in connect's environment
    try:
        server.wait_ready()
        guide = json.loads(cli(store_env, "connect", "claude-code", "--mint", "--json").stdout)
        assert guide["mcp_url"] == server.url + "/mcp" and "keyplane serve" in guide["url_source"]
        text = cli(store_env, "connect", "cursor").stdout
        assert f"# Connect Cursor to keyplane's MCP server at {server.url}/mcp" in text
        assert "URL taken from the last `keyplane serve`" in text
        # KEYPLANE_PUBLIC_URL wins, and says so.
        public = cli({**store_env, "KEYPLANE_PUBLIC_URL": "https://keys.example.com"}, "connect", "codex").stdout
        assert "https://keys.example.com/mcp" in public and "URL taken from KEYPLANE_PUBLIC_URL" in public

        # A connector client that cannot reach a loopback URL: refused before anything is minted.
        refused = cli(store_env, "connect", "chatgpt", "--mint", check=False)
        assert refused.returncode == 1 and "mcp_sa_" not in refused.stdout + refused.stderr
        assert "public HTTPS URL" in refused.stderr and "KEYPLANE_MCP_QUERY_TOKEN=true" in refused.stderr
        accounts = json.loads(cli(store_env, "sa", "list", "--json").stdout)
        assert not any(a["name"].startswith("ChatGPT") for a in accounts)
        assert sum("agent" in a["name"] for a in accounts) == 1  # only the Claude Code one above
    finally:
        server.stop()
