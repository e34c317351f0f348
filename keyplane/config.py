"""Settings from the environment (prefix ``KEYPLANE_``); see docs/configuration.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keyplane.domain.secrets_box import parse_master_key


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEYPLANE_", extra="ignore")

    home: Path = Field(default=Path(".keyplane"), description="Where the embedded SQLite store lives.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; default sqlite+aiosqlite under home."
    )
    database_schema: str | None = Field(
        default=None, description="PostgreSQL schema to use (search_path); default the server's."
    )
    redis_url: str | None = Field(
        default=None, description="redis://…: limits, spend, brake and change notices shared by every process."
    )
    redis_fail_mode: Literal["open", "closed"] = Field(
        default="open", description="Redis unreachable: 'open' falls back to per-process limits, 'closed' refuses."
    )
    redis_namespace: str = Field(default="keyplane", min_length=1,
                                 description="Prefix of keyplane's Redis keys and channel.")
    redis_timeout_seconds: float = Field(
        default=1.0, gt=0, description="Per Redis command, connect and wait for a pooled connection."
    )
    redis_spend_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Per budget script (reserve, settle): Redis slow under load is not Redis down, "
        "and a budget falling back to per-process counting can overspend.")
    redis_max_connections: int = Field(default=32, ge=1, le=10_000, description="Redis connections per process.")
    master_key: str | None = Field(
        default=None, description="base64 of 32 bytes; default a 0600 file under home (required on PostgreSQL)."
    )
    audit_checkpoint_dir: Path | None = Field(
        default=None, description="Where signed audit checkpoints are written; default audit-checkpoints under home."
    )
    audit_checkpoint_seconds: float = Field(
        default=60.0, gt=0, description="How often a new audit chain head is signed and written (and on shutdown)."
    )
    audit_checkpoint_webhook_url: str | None = Field(
        default=None, description="Also POST every new signed audit checkpoint (JSON) to this URL."
    )
    demo: bool = Field(default=False, description="Register the built-in local echo provider.")
    upstream_max_connections: int = Field(default=200, ge=1, le=100_000)
    # stdio MCP servers keyplane runs (docs/mcp-gateway.md#stdio-servers)
    mcp_stdio_commands: str = Field(
        default="", description="Executables a stdio MCP server's command may start (comma-separated, compared with "
        "the command's first element as written, e.g. 'npx,uvx,/usr/local/bin/mcp-git'; '*' for any). Empty: no "
        "stdio servers, since registering one runs a program on this host.")
    mcp_stdio_max_sessions: int = Field(default=16, ge=1, le=10_000,
                                        description="Live processes per stdio MCP server (one per client session).")
    mcp_stdio_idle_seconds: float = Field(default=300.0, gt=0,
                                          description="A stdio session with no request for this long is stopped.")
    mcp_stdio_start_seconds: float = Field(default=30.0, gt=0,
                                           description="How long a stdio server may take to answer initialize.")
    mcp_stdio_pool_size: int = Field(default=2, ge=1, le=1_000, description=(
        "Processes per stdio MCP server that keyplane starts itself to answer stateless (2026-07-28) requests, "
        "at most this many per key (never shared between keys); counted against KEYPLANE_MCP_STDIO_MAX_SESSIONS."))
    alert_interval_seconds: float = Field(default=30.0, gt=0, description="How often alert rules are evaluated.")
    admin_token: str | None = Field(default=None, description="Admin token to use on first start.")
    host: str = Field(default="127.0.0.1", min_length=1, description="Interface to bind.")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port to listen on.")
    workers: int = Field(default=1, ge=1, le=256, description="Processes `keyplane serve` runs on one machine.")
    public_url: str | None = Field(default=None, description="URL printed and used in connect snippets.")

    # Hot path
    key_cache_size: int = Field(default=100_000, ge=1)
    key_cache_ttl_seconds: float = Field(default=30.0, gt=0)
    negative_cache_size: int = Field(default=100_000, ge=1)
    negative_cache_ttl_seconds: float = Field(default=5.0, gt=0)
    change_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often a server looks for changes other processes (the CLI) made."
    )
    last_used_flush_seconds: float = Field(default=2.0, gt=0)
    recent_use_window_seconds: int = Field(default=24 * 3600, ge=1)

    trusted_proxies: str = Field(
        default="", description="Comma-separated CIDRs of proxies whose X-Forwarded-For is believed."
    )
    brake_max_failures: int = Field(default=20, ge=1, description="Failed authentications per IP per minute.")
    brake_block_seconds: float = Field(default=60.0, gt=0, description="How long a braked IP is refused.")
    access_log: bool = Field(default=True, description="One JSON log line per data-plane request.")

    # MCP server at /mcp (docs/mcp.md)
    mcp_enabled: bool = Field(default=True, description="Serve the MCP server at /mcp.")
    mcp_query_token: bool = Field(
        default=False, description="Also accept ?api_key= on the /mcp URL (for connector UIs that take only a URL)."
    )
    mcp_list_all_tools: bool = Field(
        default=False, description="tools/list shows every tool, not only those the token can call."
    )
    mcp_stateless: bool | None = Field(
        default=None, description="No MCP sessions (each request stands alone); default on with --workers > 1."
    )
    mcp_allowed_hosts: str = Field(
        default="", description="Extra Host values accepted at /mcp (comma-separated, 'name:*' for any port; "
                                "'*' turns the DNS-rebinding check off). Loopback and public_url are always allowed."
    )
    mcp_allowed_origins: str = Field(
        default="", description="Extra browser Origins accepted at /mcp and given CORS at /mcp/{name} "
                                "(comma-separated, 'http://name:*': any port)."
    )

    # Usage retention (docs/operations.md): raw events for drill-down and export, rollups for summaries.
    # 0 keeps forever. Pruned in bounded batches by a background job, never on a request path.
    usage_event_retention_days: int = Field(default=90, ge=0, description="Raw usage events kept this long.")
    rollup_minute_retention_days: int = Field(default=14, ge=0, description="Per-minute usage rollups kept this long.")
    rollup_hour_retention_days: int = Field(default=400, ge=0, description="Per-hour usage rollups kept this long.")
    rollup_day_retention_days: int = Field(default=0, ge=0, description="Per-day usage rollups (0: forever).")
    retention_interval_seconds: float = Field(default=600.0, gt=0, description="How often retention runs.")
    summary_statement_timeout_ms: int = Field(
        default=10_000, ge=0, description="PostgreSQL statement timeout of usage summaries (0: none)."
    )

    default_limit_profile: str | None = "standard"
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1_073_741_824)
    # A coding agent sends its whole conversation (and images) with every /v1/messages and /v1/responses
    # call; Anthropic accepts 32 MB on the Messages API.
    max_agent_body_bytes: int = Field(default=33_554_432, ge=1024, le=1_073_741_824)
    # Budgets (docs/gateway.md, "Budgets that hold under concurrency").
    prompt_bytes_per_token: float = Field(
        default=3.0, ge=1.0, le=16.0,
        description="Prompt tokens are estimated as request bytes / this before forwarding; 1 makes the "
                    "estimate an upper bound for text (a token is at least one byte).")
    output_allowance_tokens: int = Field(
        default=4096, ge=1, le=10_000_000,
        description="Output reserved (and set as max_tokens) for a budgeted request that names none.")
    spend_reservation_seconds: float = Field(
        default=900.0, ge=10.0, le=86_400.0,
        description="Distributed mode: a reservation a dead process left behind is dropped after this.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("home")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL such as https://keys.example.com")
        try:
            parts.port  # noqa: B018 (raises on a port out of range)
        except ValueError:
            raise ValueError("has a port outside 1-65535") from None
        return v.rstrip("/")

    @field_validator("master_key")
    @classmethod
    def _check_master_key(cls, v: str | None) -> str | None:
        if v:
            parse_master_key(v)  # raises with the fix in its message
        return v or None

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return v or None

    @model_validator(mode="after")
    def _postgresql_needs_master_key(self) -> Settings:
        if not self.is_sqlite and not self.master_key:
            raise ValueError(
                "KEYPLANE_MASTER_KEY is required with PostgreSQL (the same value on every machine): "
                "create one with `keyplane token generate --kind master` and export KEYPLANE_MASTER_KEY=<it>"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.home / 'keyplane.db').resolve()}"

    @property
    def checkpoint_dir(self) -> Path:
        return (self.audit_checkpoint_dir or self.home / "audit-checkpoints").expanduser()

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def mcp_stdio_allowed(self) -> frozenset[str]:
        return frozenset(part.strip() for part in self.mcp_stdio_commands.split(",") if part.strip())

    @property
    def mcp_sessions_stateless(self) -> bool:
        """Sessions live in one process's memory: several workers behind one port go stateless by default."""
        return self.mcp_stateless if self.mcp_stateless is not None else self.workers > 1

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104 (display only)
        return f"http://{host}:{self.port}"


def describe_invalid(exc: ValidationError) -> list[str]:
    """One line per bad setting: which variable, the value it had, what is wrong, and so what to set."""
    lines = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:  # a rule across settings: its message names the variables and the fix
            lines.append(message)
            continue
        name = f"KEYPLANE_{str(error['loc'][0]).upper()}"
        value = error.get("input")
        shown = "" if isinstance(value, dict) or name == "KEYPLANE_MASTER_KEY" else f"={value}"
        lines.append(f"{name}{shown} is not valid: {message[0].lower() + message[1:]}")
    return lines


SETTINGS_EXIT = 2  # a missing or bad setting: nothing was started or changed


def load_or_exit(**overrides: object) -> Settings:
    """The settings, or one line per bad one on stderr and exit code 2 (no traceback): for every entry point."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for line in describe_invalid(exc):
            sys.stderr.write(f"error: {line}\n")
        sys.stderr.write("(settings: docs/configuration.md)\n")
        raise SystemExit(SETTINGS_EXIT) from None
