"""Settings from the environment (prefix ``KEYPLANE_``); see docs/configuration.md."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    redis_namespace: str = Field(default="keyplane", description="Prefix of keyplane's Redis keys and channel.")
    redis_timeout_seconds: float = Field(
        default=1.0, gt=0, description="Per Redis command, connect and wait for a pooled connection."
    )
    redis_max_connections: int = Field(default=32, ge=1, description="Redis connections per process.")
    master_key: str | None = Field(
        default=None, description="base64 of 32 bytes; default a 0600 file under home (required on PostgreSQL)."
    )
    demo: bool = Field(default=False, description="Register the built-in local echo provider.")
    upstream_max_connections: int = 200
    alert_interval_seconds: float = Field(default=30.0, description="How often alert rules are evaluated.")
    admin_token: str | None = Field(default=None, description="Admin token to use on first start.")
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = Field(default=1, ge=1, description="Processes `keyplane serve` runs on one machine.")
    public_url: str | None = Field(default=None, description="URL printed and used in connect snippets.")

    # Hot path
    key_cache_size: int = 100_000
    key_cache_ttl_seconds: float = 30.0
    negative_cache_size: int = 100_000
    negative_cache_ttl_seconds: float = 5.0
    change_poll_seconds: float = Field(
        default=1.0, description="How often a server looks for changes other processes (the CLI) made."
    )
    last_used_flush_seconds: float = 2.0
    recent_use_window_seconds: int = 24 * 3600

    trusted_proxies: str = Field(
        default="", description="Comma-separated CIDRs of proxies whose X-Forwarded-For is believed."
    )
    brake_max_failures: int = Field(default=20, description="Failed authentications per IP per minute.")
    brake_block_seconds: float = Field(default=60.0, description="How long a braked IP is refused.")
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
        default="", description="Extra browser Origins accepted at /mcp (comma-separated, 'http://name:*': any port)."
    )

    default_limit_profile: str | None = "standard"
    max_body_bytes: int = 1_048_576
    log_level: str = "INFO"

    @field_validator("home")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.home / 'keyplane.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

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
