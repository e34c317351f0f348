"""Ready-to-run setup for each MCP client: one builder function per client, registered in ``CLIENTS``.
The CLI's ``keyplane connect`` and the dashboard's connect helper both print what it returns, and it
returns only what works: a client that cannot reach the URL gets what it needs instead of a snippet.

Formats, checked against each client's documentation (links in docs/mcp.md; tests/test_connect.py pins them):
- Claude Code: ``claude mcp add --transport http NAME URL --header "Authorization: Bearer …"``; ``.mcp.json``
  takes ``"headers"`` with ``${VAR}`` expansion.
- Codex: ``codex mcp add NAME --url URL --bearer-token-env-var VAR`` (Codex takes no inline token).
- VS Code: ``mcp.json`` with ``"servers"`` and ``"inputs"`` (a ``promptString`` with ``"password": true``,
  referred to as ``${input:ID}``: VS Code asks once and keeps it in its secret storage);
  ``code --add-mcp '{"name":…,"type":"http","url":…,"headers":{…}}'`` writes the entry as given.
- Cursor: ``cursor://anysphere.cursor-deeplink/mcp/install?name=NAME&config=BASE64`` (URL-encoded base64 of
  ``{"url":…,"headers":{…}}``); ``mcp.json`` takes ``${env:VAR}``.
- Claude Desktop / ChatGPT: remote connectors are reached from the vendor's cloud, not from this machine
  (Anthropic: "from Anthropic's cloud infrastructure … including Claude Desktop"; OpenAI: public HTTPS), and
  take a URL with OAuth or no authentication: so a public HTTPS URL and ``?api_key=`` (switched on) or nothing.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

SERVER_NAME = "keyplane"
TOKEN_ENV_VAR = "KEYPLANE_MCP_TOKEN"  # noqa: S105 (a variable name, not a secret)
TOKEN_PLACEHOLDER = "<token>"  # noqa: S105 (printed literally, never URL-encoded)
VSCODE_INPUT_ID = "keyplane-token"


@dataclass(frozen=True)
class Snippet:
    label: str
    kind: str  # "command" (a shell line), "json" (a file entry), "link" (open it) or "url" (paste it)
    text: str


@dataclass(frozen=True)
class Target:
    """What every builder needs: where the MCP server is, under which name, and the token if minted."""

    mcp_url: str
    token: str | None = None
    query_token_enabled: bool = False
    server_name: str = SERVER_NAME
    token_env: str = TOKEN_ENV_VAR  # where the setup reads the token from when it is not filled in
    upstream: str | None = None  # a protected MCP server at /mcp/{upstream}: the token is a virtual key


@dataclass(frozen=True)
class ConnectInstructions:
    client: str
    title: str
    mcp_url: str
    token_env_var: str
    token_included: bool
    ready: bool = True  # False: nothing here would work yet; ``notes`` say what is needed
    snippets: list[Snippet] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Setup:
    snippets: list[Snippet] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ready: bool = True


@dataclass(frozen=True)
class Client:
    title: str
    build: Callable[[Target], Setup]


def mcp_url_for(base_url: str, server: str | None = None) -> str:
    """keyplane's own MCP server, or with ``server`` the upstream MCP server it protects at /mcp/{server}."""
    return base_url.rstrip("/") + "/mcp" + (f"/{server}" if server else "")


def key_env_var(server: str) -> str:
    """Where a setup for the protected server ``server`` reads its virtual key from."""
    return f"KEYPLANE_{server.upper().replace('-', '_')}_KEY"


# -- one builder per client ----------------------------------------------------------------------------

def claude_code(t: Target) -> Setup:
    shell_token = t.token if t.token else f"${t.token_env}"  # double quotes: bash/zsh fill the variable in
    return Setup(
        snippets=[
            Snippet("Add the server (bash, zsh)", "command",
                    f"claude mcp add --transport http {t.server_name} {shlex.quote(t.mcp_url)} "
                    f'--header "Authorization: Bearer {shell_token}"'),
            Snippet("Or commit this entry to the project's .mcp.json (the token stays in the environment)", "json",
                    _json({"mcpServers": {t.server_name: {
                        "type": "http", "url": t.mcp_url,
                        "headers": {"Authorization": f"Bearer ${{{t.token_env}}}"}}}})),
        ],
        notes=["Options such as --scope project go before the server name. `claude mcp add` writes the header, "
               "token included, into Claude Code's configuration; the .mcp.json entry keeps only the variable's "
               "name. In PowerShell write $env:KEYPLANE_MCP_TOKEN instead of $KEYPLANE_MCP_TOKEN."],
    )


def codex(t: Target) -> Setup:
    return Setup(
        snippets=[
            Snippet("Keep the token in an environment variable (bash, zsh)", "command",
                    f"export {t.token_env}={shlex.quote(t.token) if t.token else TOKEN_PLACEHOLDER}"),
            Snippet("Add the server", "command", f"codex mcp add {t.server_name} "
                    f"--url {shlex.quote(t.mcp_url)} --bearer-token-env-var {t.token_env}"),
        ],
        notes=[f"Codex takes no inline token: it reads ${t.token_env} from the environment it runs in."],
    )


def vscode(t: Target) -> Setup:
    entry = _json({"inputs": [{"type": "promptString", "id": VSCODE_INPUT_ID,
                               "description": "keyplane agent token", "password": True}],
                   "servers": {t.server_name: {
                       "type": "http", "url": t.mcp_url,
                       "headers": {"Authorization": f"Bearer ${{input:{VSCODE_INPUT_ID}}}"}}}})
    setup = Setup(snippets=[Snippet(
        "Add this to .vscode/mcp.json (or MCP: Open User Configuration): VS Code asks for the token when the "
        "server first starts and keeps it in its secret storage, never in the file", "json", entry)])
    if t.token:
        config = {"name": t.server_name, "type": "http", "url": t.mcp_url,
                  "headers": {"Authorization": f"Bearer {t.token}"}}
        setup.snippets.append(Snippet("Or in one command (bash, zsh)", "command",
                                      f"code --add-mcp {shlex.quote(_compact(config))}"))
        setup.notes.append("`code --add-mcp` writes the token in plain text into your user profile's mcp.json; "
                           "the mcp.json entry above keeps it out of every file.")
    return setup


def cursor(t: Target) -> Setup:
    header = f"Bearer {t.token}" if t.token else f"Bearer ${{env:{t.token_env}}}"
    config = {"url": t.mcp_url, "headers": {"Authorization": header}}
    encoded = quote(base64.b64encode(_compact(config).encode()).decode(), safe="")
    return Setup(snippets=[
        Snippet("Add to Cursor", "link",
                f"cursor://anysphere.cursor-deeplink/mcp/install?name={t.server_name}&config={encoded}"),
        Snippet("Or this entry in ~/.cursor/mcp.json (or .cursor/mcp.json in the project)", "json",
                _json({"mcpServers": {t.server_name: {
                    "url": t.mcp_url, "headers": {"Authorization": f"Bearer ${{env:{t.token_env}}}"}}}})),
    ])


CLAUDE_DESKTOP_STEPS = "In Claude Desktop (or claude.ai): Settings → Connectors → Add custom connector, paste the URL"
CHATGPT_STEPS = ("In ChatGPT: Settings → Connectors → Advanced → turn on Developer mode, then Settings → Connectors "
                 "→ Create: paste the URL as the MCP server URL, Authentication: No authentication")


def claude_desktop(t: Target) -> Setup:
    if t.upstream:
        return _upstream_bridge(t)
    return _connector(t, "Anthropic's cloud", CLAUDE_DESKTOP_STEPS)


def chatgpt(t: Target) -> Setup:
    if t.upstream:
        return Setup(ready=False, notes=[_header_only(t.upstream)])
    return _connector(t, "OpenAI's cloud", CHATGPT_STEPS)


def _connector(t: Target, vendor: str, steps: str) -> Setup:
    """Connector UIs take a URL and connect from the vendor's cloud, with OAuth or no authentication."""
    needed = connector_requirements(t.mcp_url, t.query_token_enabled, vendor)
    if needed:
        return Setup(ready=False, notes=needed)
    url = f"{t.mcp_url}?api_key={quote(t.token, safe='') if t.token else TOKEN_PLACEHOLDER}"
    label = steps if t.token else steps + f" (put your agent token in place of {TOKEN_PLACEHOLDER})"
    return Setup(snippets=[Snippet(label, "url", url)], notes=[URL_CREDENTIAL_TRADE_OFF])


def _header_only(server: str) -> str:
    return (f"/mcp/{server} takes the key only in an Authorization header; remote connectors that accept only "
            "a URL or OAuth (ChatGPT, Claude's connector UI) cannot reach it directly.")


def _upstream_bridge(t: Target) -> Setup:
    """/mcp/{server} takes a key only in a header, which connector UIs cannot send: Claude Desktop can still
    run a local bridge (mcp-remote) that adds the header."""
    assert t.upstream is not None
    return Setup(snippets=[Snippet(
        "Claude Desktop: a local bridge (mcp-remote, from npm) in claude_desktop_config.json", "json",
        _json({"mcpServers": {t.server_name: {
            "command": "npx", "args": ["-y", "mcp-remote", t.mcp_url, "--header",
                                       "Authorization: Bearer ${" + t.token_env + "}"],
            "env": {t.token_env: t.token or TOKEN_PLACEHOLDER}}}}))], notes=[_header_only(t.upstream)])


URL_CREDENTIAL_TRADE_OFF = (
    "The token travels in the URL: it can end up in proxy and access logs, browser history and the vendor's "
    "connector settings, and anyone holding the URL holds the token. Use a narrowly scoped agent token "
    "(`keyplane connect CLIENT --mint`) and revoke it when done (`keyplane sa revoke`); prefer a client that "
    "sends a header (Claude Code, Codex, VS Code, Cursor) where you can.")


def connector_requirements(mcp_url: str, query_token_enabled: bool, vendor: str = "the vendor's cloud") -> list[str]:
    """What a connector client needs that is not there yet (empty: it can connect)."""
    needed = []
    parts = urlsplit(mcp_url)
    if parts.scheme != "https" or _is_local(parts.hostname or ""):
        needed.append(
            f"This client connects from {vendor}, not from this machine, so {mcp_url} cannot work: it needs a "
            "public HTTPS URL. Put keyplane behind a TLS proxy reachable from the internet and start it with "
            "KEYPLANE_PUBLIC_URL=https://your.host (see docs/operations.md).")
    if not query_token_enabled:
        needed.append("These clients accept only OAuth or no authentication, so the token has to travel in the URL "
                      "(?api_key=): start keyplane with KEYPLANE_MCP_QUERY_TOKEN=true. " + URL_CREDENTIAL_TRADE_OFF)
    return needed


def _is_local(host: str) -> bool:
    if host in ("localhost", "") or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified


CLIENTS_SPEC: dict[str, Client] = {
    "claude-code": Client("Claude Code", claude_code),
    "codex": Client("Codex", codex),
    "vscode": Client("VS Code", vscode),
    "cursor": Client("Cursor", cursor),
    "claude-desktop": Client("Claude Desktop", claude_desktop),
    "chatgpt": Client("ChatGPT", chatgpt),
}
CLIENTS: dict[str, str] = {name: spec.title for name, spec in CLIENTS_SPEC.items()}


def connect_instructions(
    client: str, mcp_url: str, token: str | None = None, *, query_token_enabled: bool = False,
    server: str | None = None,
) -> ConnectInstructions:
    """Setup for ``client``: filled in with ``token`` if given, else reading it from $KEYPLANE_MCP_TOKEN.

    With ``server``, the setup is for the protected upstream at /mcp/{server} and ``token`` a virtual key."""
    if client not in CLIENTS_SPEC:
        raise ValueError(f"unknown client '{client}': one of {', '.join(CLIENTS)}")
    var = key_env_var(server) if server else TOKEN_ENV_VAR
    target = Target(mcp_url, token, query_token_enabled, server_name=server or SERVER_NAME, token_env=var,
                    upstream=server)
    setup = CLIENTS_SPEC[client].build(target)
    return ConnectInstructions(client=client, title=CLIENTS[client], mcp_url=mcp_url, token_env_var=var,
                               token_included=token is not None and setup.ready, ready=setup.ready,
                               snippets=setup.snippets, notes=setup.notes)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
