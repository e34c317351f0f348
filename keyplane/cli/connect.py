"""``keyplane connect CLIENT``: a ready-to-run setup that connects a coding agent to keyplane."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keyplane.cli.shell import AsJson, Org, _fail, _principal, _print_json, load_settings, run
from keyplane.mcp_server.connect import CLIENTS, connect_instructions, mcp_url_for
from keyplane.mcp_server.model_connect import MODEL_CLIENTS, mint_model_key, model_traffic_instructions
from keyplane.services.container import Keyplane


def connect(
    client: Annotated[str, typer.Argument(help=f"One of: {', '.join(CLIENTS)}.")],
    mint: Annotated[bool, typer.Option("--mint", help="Mint a narrowly scoped agent token (audited) and fill it "
                                                      "in; otherwise the setup reads $KEYPLANE_MCP_TOKEN.")] = False,
    url: Annotated[str | None, typer.Option(help="keyplane's URL as the agent reaches it (default "
                                                 "KEYPLANE_PUBLIC_URL, else the URL the last `keyplane serve` "
                                                 "printed, else host:port).")] = None,
    server: Annotated[str | None, typer.Option(help="Connect to this protected MCP server at /mcp/NAME instead; "
                                                    "--mint then mints a virtual key for it.")] = None,
    org: Org = "default",
    as_json: AsJson = False,
    models: Annotated[bool, typer.Option("--models", help="Instead: send the agent's own model calls through "
                                                          "keyplane (claude-code, codex) with a new virtual key.")]
    = False,
    profile: Annotated[str | None, typer.Option(help="With --models: the limit profile (budget, rate) of the "
                                                     "minted key.")] = None,
) -> None:
    """Print a ready-to-run setup that connects a coding agent to keyplane's MCP server at /mcp."""
    from keyplane.cli_mcp_servers import connect_server  # here: cli_mcp_servers imports keyplane.cli
    from keyplane.served_url import assumed_base_url

    if models:
        _connect_models(client, profile, url, org, as_json)
        return
    if client not in CLIENTS:
        _fail(f"invalid_request: unknown client '{client}': one of {', '.join(CLIENTS)}")
    settings = load_settings()
    base_url, source = assumed_base_url(settings, url)
    if server:
        connect_server(client, server, mint, base_url, org, as_json)
        return
    mcp_url = mcp_url_for(base_url)
    # Refuse before minting: a token for a setup that cannot work is a live secret for nothing.
    probe = connect_instructions(client, mcp_url, None, query_token_enabled=settings.mcp_query_token)
    if not probe.ready:
        typer.echo(f"error: {probe.title} cannot connect to {mcp_url} as things stand:", err=True)
        for note in probe.notes:
            typer.echo(f"  - {note}", err=True)
        raise typer.Exit(1)
    token: str | None = None
    minted: dict[str, Any] | None = None
    if mint:

        async def job(kp: Keyplane) -> tuple[dict[str, Any], str]:
            return await kp.service_accounts.mint_agent_token(await _principal(kp, org), CLIENTS[client])

        minted, token = run(job)
    guide = connect_instructions(client, mcp_url, token, query_token_enabled=settings.mcp_query_token)
    if as_json:
        _print_json({**guide.to_dict(), "service_account": minted, "url_source": source})
        return
    typer.echo(f"# Connect {guide.title} to keyplane's MCP server at {guide.mcp_url}")
    typer.echo(f"# URL taken from {source}; pass --url if the agent reaches keyplane elsewhere.")
    if minted is not None:
        typer.echo(f"# Minted service account {minted['id']} ({', '.join(minted['scopes'])}).")
        typer.echo("# The token below is shown once: keyplane keeps only its SHA-256.")
    else:
        typer.echo(f"# The token is read from ${guide.token_env_var}: `keyplane connect {client} --mint` mints one.")
    for snippet in guide.snippets:
        typer.echo(f"\n# {snippet.label}:\n{snippet.text}")
    for note in guide.notes:
        typer.echo(f"\n# Note: {note}")
    if minted is not None and not any(token in s.text for s in guide.snippets if token):
        typer.echo(f"\n# The token (paste it when {guide.title} asks):\n{token}")


def _connect_models(client: str, profile: str | None, url: str | None, org: str, as_json: bool) -> None:
    """``connect CLIENT --models``: a fresh virtual key budgeted by ``profile``, and the agent's model setup."""
    if client not in MODEL_CLIENTS:
        _fail(f"invalid_request: --models works for {', '.join(MODEL_CLIENTS)}, not '{client}'")
    if not profile:
        _fail("invalid_request: --models needs --profile NAME: the limit profile that budgets the agent's key "
              "(`keyplane limit-profiles list`)")
    assert profile is not None

    async def job(kp: Keyplane) -> tuple[dict[str, Any], str, list[str]]:
        return await mint_model_key(kp, await _principal(kp, org), client, profile)

    key, secret, served = run(job)
    from keyplane.served_url import assumed_base_url

    base_url, _source = assumed_base_url(load_settings(), url)
    guide = model_traffic_instructions(client, base_url, secret, served)
    if as_json:
        _print_json({**guide.to_dict(), "key": key})
        return
    typer.echo(f"# Send {guide.title}'s model calls through keyplane with virtual key {key['id']} "
               f"(profile {profile}; scopes {', '.join(key['scopes'])}).")
    typer.echo("# The key below is shown once: keyplane keeps only its SHA-256.")
    for snippet in guide.snippets:
        typer.echo(f"\n# {snippet.label}:\n{snippet.text}")
    for note in guide.notes:
        typer.echo(f"\n# Note: {note}")


