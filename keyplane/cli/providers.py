"""``keyplane providers …``: upstream LLM providers and their model prices."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from keyplane.cli.shell import PLAIN_HELP, AsJson, Org, _emit, _fail, _principal, print_table, run
from keyplane.services.container import Keyplane
from keyplane.services.schemas import ProviderCreate, ProviderUpdate

providers_app = typer.Typer(help="Upstream providers (OpenAI-compatible).", no_args_is_help=True, **PLAIN_HELP)


def _models(specs: list[str]) -> list[dict[str, Any]]:
    """``name``, ``name=IN/OUT`` or ``name=IN/OUT/CACHE_WRITE/CACHE_READ`` (USD per million tokens)."""
    fields = ("input_per_mtok", "output_per_mtok", "cache_write_per_mtok", "cache_read_per_mtok")
    out = []
    for spec in specs:
        name, _, prices = spec.partition("=")
        entry: dict[str, Any] = {"name": name}
        if prices:
            parts = prices.split("/")
            try:
                if len(parts) not in (1, 2, 4):
                    raise ValueError(spec)
                entry.update({"output_per_mtok": 0.0} | {f: float(v) for f, v in zip(fields, parts, strict=False)})
            except ValueError:
                _fail(f"invalid_request: --model takes name, name=IN/OUT or name=IN/OUT/CACHE_WRITE/CACHE_READ "
                      f"prices, not '{spec}'")
        out.append(entry)
    return out


def _provider_secret(api_key_env: str | None) -> str | None:
    if api_key_env is None:
        return None
    value = os.environ.get(api_key_env)
    if not value:
        _fail(f"invalid_request: environment variable {api_key_env} is empty or unset")
    return value


PROVIDER_COLUMNS = ("name", "kind", "base_url", "api_key", "models", "timeout_seconds")


def _provider_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "models": [m["name"] for m in r["models"]]} for r in rows]


@providers_app.command("add")
def providers_add(
    name: str,
    base_url: Annotated[str, typer.Option(help="e.g. https://api.openai.com/v1")],
    model: Annotated[list[str], typer.Option("--model", "-m", help="name, name=IN/OUT or "
                                                  "name=IN/OUT/CACHE_WRITE/CACHE_READ USD per 1M tokens (repeat)")],
    api_key_env: Annotated[str | None, typer.Option(help="Read the provider's secret from this env variable "
                                                         "(never from the command line).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the upstream.")] = 60.0,
    kind: Annotated[str, typer.Option(help="openai (OpenAI-compatible) or anthropic (Messages API)")] = "openai",
    org: Org = "default",
) -> None:
    """Register an upstream (OpenAI-compatible or Anthropic); its secret is encrypted at rest and never shown again."""
    body: dict[str, Any] = {"name": name, "kind": kind, "base_url": base_url, "models": _models(model),
                            "timeout_seconds": timeout}
    secret = _provider_secret(api_key_env)
    if secret:
        body["api_key"] = secret

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.providers.create(await _principal(kp, org), ProviderCreate.model_validate(body))

    print_table(_provider_rows([run(job)]), PROVIDER_COLUMNS)


@providers_app.command("list")
def providers_list(org: Org = "default", as_json: AsJson = False) -> None:
    """List providers (secrets masked)."""

    async def job(kp: Keyplane) -> list[dict[str, Any]]:
        return await kp.providers.list(await _principal(kp, org))

    rows = run(job)
    _emit(rows, as_json, _provider_rows(rows), PROVIDER_COLUMNS)


@providers_app.command("update")
def providers_update(
    name: str,
    base_url: Annotated[str | None, typer.Option()] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Replace the model list (repeat).")]
    = None,
    api_key_env: Annotated[str | None, typer.Option(help="Rotate: read the new secret from this env variable.")]
    = None,
    timeout: Annotated[float | None, typer.Option()] = None,
    org: Org = "default",
) -> None:
    """Change a provider: base URL, models and prices, timeout, or rotate its secret."""
    changes: dict[str, Any] = {}
    if base_url is not None:
        changes["base_url"] = base_url
    if model:
        changes["models"] = _models(model)
    if timeout is not None:
        changes["timeout_seconds"] = timeout
    secret = _provider_secret(api_key_env)
    if secret:
        changes["api_key"] = secret

    async def job(kp: Keyplane) -> dict[str, Any]:
        return await kp.providers.update(await _principal(kp, org), name, ProviderUpdate.model_validate(changes))

    print_table(_provider_rows([run(job)]), PROVIDER_COLUMNS)


@providers_app.command("delete")
def providers_delete(name: str, org: Org = "default") -> None:
    """Remove a provider; its models stop being served at once."""

    async def job(kp: Keyplane) -> None:
        await kp.providers.delete(await _principal(kp, org), name)

    run(job)
    typer.echo(f"{name} deleted")

