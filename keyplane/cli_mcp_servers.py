"""`keyplane mcp-servers …` and `keyplane connect CLIENT --server NAME`: upstream MCP servers behind keys."""

from __future__ import annotations

import os
import shlex
from typing import Annotated, Any

import typer

from keyplane.cli import AsJson, Org, _emit, _fail, _principal, _print_json, _show_secret, print_table, run
from keyplane.gateway.mcp_stdio import RoutedUpstream, StdioUpstream
from keyplane.gateway.mcp_upstream import HttpUpstream
from keyplane.mcp_server.connect import connect_instructions, mcp_url_for
from keyplane.services.container import Keyplane
from keyplane.services.schemas import McpServerCreate, McpServerUpdate

mcp_servers_app = typer.Typer(help="Upstream MCP servers served to key holders at /mcp/NAME.", no_args_is_help=True)
COLUMNS = ("name", "status", "url", "command", "headers", "env", "tool_scopes", "path")


def _headers(pairs: list[str] | None, option: str = "--header-env", what: str = "header") -> dict[str, str]:
    """NAME=ENV_VAR pairs: each value is read from the environment, never from the command line."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, var = pair.partition("=")
        if not sep or not name or not var:
            _fail(f"invalid_request: {option} takes NAME=ENV_VAR, not '{pair}'")
        value = os.environ.get(var)
        if not value:
            _fail(f"invalid_request: environment variable {var} (for {what} {name}) is not set")
        out[name] = value  # type: ignore[assignment]
    return out


def _argv(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        _fail(f"invalid_request: --command: {exc}")
    if not argv:
        _fail("invalid_request: --command is empty")
    return argv


def _tool_scopes(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        tool, sep, scope = pair.partition("=")
        if not sep or not tool or not scope:
            _fail(f"invalid_request: --tool-scope takes TOOL=SCOPE, not '{pair}'")
        out[tool] = scope
    return out


HeaderEnv = Annotated[list[str] | None, typer.Option(
    "--header-env", help="NAME=ENV_VAR: send header NAME upstream with the value of $ENV_VAR (repeat).")]
Command = Annotated[str | None, typer.Option(
    help="A stdio MCP server keyplane runs, as one shell-quoted string: 'npx -y @modelcontextprotocol/server-"
         "filesystem /srv/docs' (split like a shell, never run by one); its executable must be listed in "
         "KEYPLANE_MCP_STDIO_COMMANDS.")]
EnvFrom = Annotated[list[str] | None, typer.Option(
    "--env-from", help="NAME=ENV_VAR: a stdio server's process gets NAME with the value of $ENV_VAR (repeat).")]
Cwd = Annotated[str | None, typer.Option(help="Working directory of a stdio server's process (absolute).")]
ToolScope = Annotated[list[str] | None, typer.Option(
    "--tool-scope", help="TOOL=SCOPE: the data-plane scope a tool needs (default tools:call; repeat).")]


@mcp_servers_app.command("add")
def add(
    name: str,
    url: Annotated[str | None, typer.Option(
        help="The upstream's Streamable HTTP endpoint, e.g. http://127.0.0.1:9000/mcp (or --command)")] = None,
    command: Command = None,
    env_from: EnvFrom = None,
    cwd: Cwd = None,
    header_env: HeaderEnv = None,
    tool_scope: ToolScope = None,
    description: Annotated[str | None, typer.Option()] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the upstream.")] = 30.0,
    no_key: Annotated[bool, typer.Option("--no-key", help="Do not mint the server's default key.")] = False,
    org: Org = "default",
    as_json: AsJson = False,
) -> None:
    """Register an MCP server (--url) or a stdio one keyplane runs (--command); its headers or env are sealed at rest,
    and its default key is printed once."""
    stdio = {"command": _argv(command), "env": _headers(env_from, "--env-from", "variable"), "cwd": cwd} \
        if command else {}
    body = McpServerCreate.model_validate({
        "name": name, "url": url, **stdio, "headers": _headers(header_env), "tool_scopes": _tool_scopes(tool_scope),
        "description": description, "timeout_seconds": timeout, "default_key": not no_key})

    async def job(kp: Keyplane) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
        return await kp.mcp_servers.create(await _principal(kp, org), body)

    server, key, secret = run(job)
    if as_json:
        _print_json({"mcp_server": server, "key": key, "secret": secret})
        return
    print_table([server], COLUMNS)
    if secret:
        _show_secret(f"key for /mcp/{name} ({key['id'] if key else ''})", secret)


@mcp_servers_app.command("list")
def list_(org: Org = "default", as_json: AsJson = False) -> None:
    """List MCP servers (header values are never shown)."""

    async def job(kp: Keyplane) -> list[dict[str, Any]]:
        return await kp.mcp_servers.list(await _principal(kp, org))

    rows = run(job)
    _emit(rows, as_json, rows, COLUMNS)


@mcp_servers_app.command("show")
def show(name: str, org: Org = "default") -> None:
    """One MCP server as JSON."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.mcp_servers.get(await _principal(kp, org), name)

    _print_json(run(job))


@mcp_servers_app.command("update")
def update(
    name: str,
    url: Annotated[str | None, typer.Option()] = None,
    command: Command = None,
    env_from: EnvFrom = None,
    clear_env: Annotated[bool, typer.Option("--clear-env", help="Give a stdio server no env of its own.")] = False,
    cwd: Cwd = None,
    header_env: HeaderEnv = None,
    clear_headers: Annotated[bool, typer.Option("--clear-headers", help="Send no headers upstream.")] = False,
    tool_scope: ToolScope = None,
    description: Annotated[str | None, typer.Option()] = None,
    timeout: Annotated[float | None, typer.Option()] = None,
    org: Org = "default",
) -> None:
    """Change an MCP server: URL or command, headers or env (all replaced), cwd, tool scopes (all replaced),
    description, timeout."""
    changes: dict[str, Any] = {}
    if url is not None:
        changes["url"] = url
    if command is not None:
        changes["command"] = _argv(command)
    if env_from or clear_env:
        changes["env"] = _headers(env_from, "--env-from", "variable")
    if cwd is not None:
        changes["cwd"] = cwd
    if header_env or clear_headers:
        changes["headers"] = _headers(header_env)
    if tool_scope:
        changes["tool_scopes"] = _tool_scopes(tool_scope)
    if description is not None:
        changes["description"] = description
    if timeout is not None:
        changes["timeout_seconds"] = timeout

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.mcp_servers.update(await _principal(kp, org), name, McpServerUpdate.model_validate(changes))

    print_table([run(job)], COLUMNS)


@mcp_servers_app.command("disable")
def disable(name: str, org: Org = "default") -> None:
    """Stop serving an MCP server (keys keep their permissions; `enable` brings it back)."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.mcp_servers.set_status(await _principal(kp, org), name, enabled=False)

    print_table([run(job)], COLUMNS)


@mcp_servers_app.command("enable")
def enable(name: str, org: Org = "default") -> None:
    """Serve a disabled MCP server again."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.mcp_servers.set_status(await _principal(kp, org), name, enabled=True)

    print_table([run(job)], COLUMNS)


@mcp_servers_app.command("delete")
def delete(name: str, org: Org = "default") -> None:
    """Remove an MCP server (its sealed headers go with it)."""

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.mcp_servers.delete(await _principal(kp, org), name)

    run(job)
    typer.echo(f"deleted MCP server {name}")


@mcp_servers_app.command("health")
def health(name: str, org: Org = "default", as_json: AsJson = False) -> None:
    """Ask the upstream now: reachable? which tools? (exit code 1 when unreachable)"""

    async def job(kp: Keyplane) -> dict[str, Any]:
        upstream = RoutedUpstream(HttpUpstream(4), StdioUpstream(kp.settings))
        kp.mcp_servers.probe = upstream.probe
        try:
            return await kp.mcp_servers.health(await _principal(kp, org), name)
        finally:
            await upstream.close()

    report = run(job)
    if as_json:
        _print_json(report)
    else:
        state = "reachable" if report["reachable"] else f"UNREACHABLE: {report['error']}"
        typer.echo(f"{name}: {state} ({report.get('latency_ms')} ms)")
        for tool in report.get("tools", []):
            typer.echo(f"  {tool}")
    if not report["reachable"]:
        raise typer.Exit(1)


def connect_server(client: str, server: str, mint: bool, base_url: str, org: str, as_json: bool) -> None:
    """`keyplane connect CLIENT --server NAME [--mint]`: a setup for the protected server, with a fresh key."""
    token: str | None = None
    key: dict[str, Any] | None = None
    probe = connect_instructions(client, mcp_url_for(base_url, server), None, server=server)
    if not probe.ready:  # refuse before minting: a key for a setup that cannot work is a live secret for nothing
        typer.echo(f"error: {probe.title} cannot connect to {probe.mcp_url}:", err=True)
        for note in probe.notes:
            typer.echo(f"  - {note}", err=True)
        raise typer.Exit(1)
    if mint:

        async def job(kp: Keyplane) -> tuple[dict[str, Any], str]:
            return await kp.mcp_servers.mint_key(await _principal(kp, org), server, f"{client} for {server}")

        key, token = run(job)
    guide = connect_instructions(client, mcp_url_for(base_url, server), token, server=server)
    if as_json:
        _print_json({**guide.to_dict(), "key": key})
        return
    typer.echo(f"# Connect {guide.title} to the MCP server '{server}' behind keyplane at {guide.mcp_url}")
    if key is not None:
        typer.echo(f"# Minted virtual key {key['id']} for every tool of '{server}' ({', '.join(key['scopes'])}).")
        typer.echo("# The key below is shown once: keyplane keeps only its SHA-256.")
    else:
        typer.echo(f"# The key is read from ${guide.token_env_var}: `keyplane connect {client} --server {server} "
                   "--mint` mints one.")
    for snippet in guide.snippets:
        typer.echo(f"\n# {snippet.label}:\n{snippet.text}")
    for note in guide.notes:
        typer.echo(f"\n# Note: {note}")
