"""``keyplane connect CLIENT --models``: send a coding agent's own model calls through keyplane.

A fresh virtual key is minted for the agent, budgeted by a limit profile the user names, with only the
scope its API needs; the setup printed points the agent at keyplane with that key. The formats were
checked against the clients' documentation (docs/gateway.md, "Coding agents' model traffic"):
- Claude Code speaks the Anthropic Messages API: ``ANTHROPIC_BASE_URL`` (no ``/v1``: it appends
  ``/v1/messages`` itself) and ``ANTHROPIC_AUTH_TOKEN`` (sent as ``Authorization: Bearer``);
  ``ANTHROPIC_API_KEY`` (sent as ``x-api-key``) would win over it, so it is unset.
- Codex speaks the OpenAI Responses API through a custom ``[model_providers.<id>]`` table in
  ``~/.codex/config.toml``: ``base_url`` (with ``/v1``: Codex appends ``/responses``), ``env_key`` naming
  the variable that holds the key, ``wire_api = "responses"``; ``model_provider`` selects it.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from keyplane.domain.errors import KeyplaneError
from keyplane.mcp_server.connect import ConnectInstructions, Snippet
from keyplane.services.container import Keyplane
from keyplane.services.principal import Principal
from keyplane.services.schemas import KeyCreate

PROVIDER_ID = "keyplane"
CODEX_KEY_VAR = "KEYPLANE_API_KEY"
# client -> (title, the one data-plane scope its model API needs, the provider kind that serves it)
MODEL_CLIENTS: dict[str, tuple[str, str, str]] = {
    "claude-code": ("Claude Code", "messages:create", "anthropic"),
    "codex": ("Codex", "responses:create", "openai"),
}


def model_traffic_instructions(client: str, base_url: str, secret: str | None,
                               models: list[str]) -> ConnectInstructions:
    """The setup for ``client``'s model calls; ``models`` are the ones keyplane serves for its API."""
    if client not in MODEL_CLIENTS:
        raise ValueError(f"--models works for {', '.join(MODEL_CLIENTS)}, not '{client}'")
    title = MODEL_CLIENTS[client][0]
    root = base_url.rstrip("/")
    token = secret or "<virtual key>"
    snippets: list[Snippet] = []
    notes: list[str] = []
    if client == "claude-code":
        env = {"ANTHROPIC_BASE_URL": root, "ANTHROPIC_AUTH_TOKEN": token}
        snippets.append(Snippet("In the shell that runs claude", "command", "\n".join(
            [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
            + ["unset ANTHROPIC_API_KEY  # it would be sent instead of the token above"])))
        snippets.append(Snippet("Or in ~/.claude/settings.json (never in a project's committed .claude/settings.json)",
                                "json", json.dumps({"env": env}, indent=2)))
        if models:
            notes.append(f"keyplane serves these Anthropic models: {', '.join(models)}. Claude Code asks for its "
                         "default model names: pick one keyplane serves with ANTHROPIC_MODEL (and "
                         "ANTHROPIC_DEFAULT_HAIKU_MODEL for background calls) or /model.")
        notes.append("Check with /status in Claude Code: the base URL is keyplane's and the auth token is "
                     "ANTHROPIC_AUTH_TOKEN.")
    else:
        model = models[0] if models else "<model keyplane serves>"
        config = "\n".join([
            f"model_provider = {json.dumps(PROVIDER_ID)}",
            f"model = {json.dumps(model)}",
            "",
            f"[model_providers.{PROVIDER_ID}]",
            'name = "keyplane"',
            f"base_url = {json.dumps(root + '/v1')}",
            f"env_key = {json.dumps(CODEX_KEY_VAR)}",
            'wire_api = "responses"',
        ])
        snippets.append(Snippet("Keep the key in the environment Codex runs in", "command",
                                f"export {CODEX_KEY_VAR}={shlex.quote(token)}"))
        snippets.append(Snippet("Add to ~/.codex/config.toml (root keys before any table)", "toml", config))
        if models:
            notes.append(f"keyplane serves these OpenAI-compatible models: {', '.join(models)}.")
        notes.append("A project's .codex/config.toml cannot set model_provider: use ~/.codex/config.toml.")
    return ConnectInstructions(client=client, title=title, mcp_url="", token_env_var=(
        "ANTHROPIC_AUTH_TOKEN" if client == "claude-code" else CODEX_KEY_VAR), token_included=secret is not None,
        snippets=snippets, notes=notes)


async def mint_model_key(kp: Keyplane, principal: Principal, client: str, profile: str) -> tuple[dict[str, Any], str,
                                                                                          list[str]]:
    """A new virtual key for ``client``'s model calls under ``profile``, and the models it can reach."""
    if client not in MODEL_CLIENTS:
        raise KeyplaneError(400, "invalid_request", f"--models works for {', '.join(MODEL_CLIENTS)}, not '{client}'")
    title, scope, kind = MODEL_CLIENTS[client]
    key, secret = await kp.keys.create(principal, KeyCreate(
        name=f"{title} model traffic", scopes=["models:read", scope], limit_profile=profile,
        metadata={"client": client, "purpose": "model traffic"}))
    routes = await kp.routes_for(principal.org_id)
    models = sorted(name for name, route in routes.items() if route.kind == kind)
    return key, secret, models
