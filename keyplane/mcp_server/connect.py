"""Ready-to-run setup for each MCP client. One function builds every format; the CLI's
``keyplane connect`` and the dashboard's connect helper both print what it returns.

Formats, checked against each client's documentation (see docs/mcp.md for the links):
- Claude Code: ``claude mcp add --transport http NAME URL --header "Authorization: Bearer …"``; ``.mcp.json``
  takes ``"headers"`` with ``${VAR}`` expansion.
- Codex: ``codex mcp add NAME --url URL --bearer-token-env-var VAR`` (Codex takes no inline token).
- VS Code: ``code --add-mcp '{"name":…,"type":"http","url":…,"headers":{…}}'``.
- Cursor: ``cursor://anysphere.cursor-deeplink/mcp/install?name=NAME&config=BASE64`` (URL-encoded base64 of
  ``{"url":…,"headers":{…}}``); ``mcp.json`` takes ``${env:VAR}``.
- Claude Desktop / ChatGPT: remote connectors take a URL (and may accept only OAuth or no auth).
"""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

SERVER_NAME = "keyplane"
TOKEN_ENV_VAR = "KEYPLANE_MCP_TOKEN"  # noqa: S105 (a variable name, not a secret)
CLIENTS: dict[str, str] = {
    "claude-code": "Claude Code",
    "codex": "Codex",
    "vscode": "VS Code",
    "cursor": "Cursor",
    "claude-desktop": "Claude Desktop",
    "chatgpt": "ChatGPT",
}


@dataclass(frozen=True)
class Snippet:
    label: str
    kind: str  # "command" (a shell line), "json" (a file entry), "link" (open it) or "url" (paste it)
    text: str


@dataclass(frozen=True)
class ConnectInstructions:
    client: str
    title: str
    mcp_url: str
    token_env_var: str
    token_included: bool
    snippets: list[Snippet] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcp_url_for(base_url: str) -> str:
    return base_url.rstrip("/") + "/mcp"


def connect_instructions(
    client: str, mcp_url: str, token: str | None = None, *, query_token_enabled: bool = False
) -> ConnectInstructions:
    """Setup for ``client``: filled in with ``token`` if given, else reading it from $KEYPLANE_MCP_TOKEN."""
    if client not in CLIENTS:
        raise ValueError(f"unknown client '{client}': one of {', '.join(CLIENTS)}")
    var = TOKEN_ENV_VAR
    snippets: list[Snippet] = []
    notes: list[str] = []
    export = Snippet("Keep the token in an environment variable", "command", f"export {var}={token or '<token>'}")

    if client == "claude-code":
        shell_token = token if token else f"${var}"  # double quotes: the shell fills the variable in
        snippets.append(Snippet("Add the server", "command",
                                f"claude mcp add --transport http {SERVER_NAME} {shlex.quote(mcp_url)} "
                                f'--header "Authorization: Bearer {shell_token}"'))
        snippets.append(Snippet("Or commit this entry to the project's .mcp.json (the token stays in the environment)",
                                "json", _json({"mcpServers": {SERVER_NAME: {
                                    "type": "http", "url": mcp_url,
                                    "headers": {"Authorization": f"Bearer ${{{var}}}"}}}})))
        notes.append("Options such as --scope project go before the server name.")
    elif client == "codex":
        snippets.append(export)
        snippets.append(Snippet("Add the server", "command", f"codex mcp add {SERVER_NAME} "
                                f"--url {shlex.quote(mcp_url)} --bearer-token-env-var {var}"))
        notes.append(f"Codex takes no inline token: it reads ${var} from the environment it runs in.")
    elif client == "vscode":
        header = f"Bearer {token}" if token else f"Bearer ${var}"
        config = {"name": SERVER_NAME, "type": "http", "url": mcp_url, "headers": {"Authorization": header}}
        if token:
            command = f"code --add-mcp {shlex.quote(_compact(config))}"
        else:  # double quotes so the shell fills in the token
            command = "code --add-mcp " + '"' + _compact(config).replace('"', '\\"') + '"'
        snippets.append(Snippet("Add the server", "command", command))
        snippets.append(Snippet("Or this entry in .vscode/mcp.json (VS Code asks for the token once)", "json",
                                _json({"inputs": [{"type": "promptString", "id": "keyplane-token",
                                                   "description": "keyplane agent token", "password": True}],
                                       "servers": {SERVER_NAME: {
                                           "type": "http", "url": mcp_url,
                                           "headers": {"Authorization": "Bearer ${input:keyplane-token}"}}}})))
    elif client == "cursor":
        header = f"Bearer {token}" if token else f"Bearer ${{env:{var}}}"
        config = {"url": mcp_url, "headers": {"Authorization": header}}
        encoded = quote(base64.b64encode(_compact(config).encode()).decode(), safe="")
        snippets.append(Snippet("Add to Cursor", "link",
                                f"cursor://anysphere.cursor-deeplink/mcp/install?name={SERVER_NAME}&config={encoded}"))
        snippets.append(Snippet("Or this entry in ~/.cursor/mcp.json (or .cursor/mcp.json in the project)", "json",
                                _json({"mcpServers": {SERVER_NAME: {
                                    "url": mcp_url, "headers": {"Authorization": f"Bearer ${{env:{var}}}"}}}})))
    else:  # claude-desktop, chatgpt: a connector URL is all their UI takes
        url = mcp_url + "?" + urlencode({"api_key": token or f"<{var}>"})
        snippets.append(Snippet("Connector URL (Settings → Connectors → Add custom connector)", "url", url))
        notes.append("These clients may accept only OAuth or no authentication for remote connectors; "
                     "a token in a URL can end up in logs and history, so prefer a client that sends a header.")
        if not query_token_enabled:
            notes.append("This server refuses tokens in the URL: start it with KEYPLANE_MCP_QUERY_TOKEN=true.")
    return ConnectInstructions(client=client, title=CLIENTS[client], mcp_url=mcp_url, token_env_var=var,
                               token_included=token is not None, snippets=snippets, notes=notes)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
