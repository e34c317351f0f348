"""SQLAlchemy models. Every row below ``organizations`` carries ``org_id``; repositories filter on it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import true as sa_true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from keyplane.domain import latency_sketch
from keyplane.domain.audit_chain import GENESIS_HASH


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which keeps naive values) and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The audit chain head: appends lock this row, so two writers never fork the chain.
    audit_seq: Mapped[int] = mapped_column(Integer, default=0)
    audit_head: Mapped[str] = mapped_column(String(64), default=GENESIS_HASH)
    # Entries up to this seq were written with the legacy unkeyed hash (before migration 0004).
    audit_legacy_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ServiceAccount(Base):
    __tablename__ = "service_accounts"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_mask: Mapped[str] = mapped_column(String(40))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class LimitProfile(Base):
    __tablename__ = "limit_profiles"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_limit_profiles_org_name"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost_per_day_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    budget_per_month_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Lower an answer's max_tokens to what the budget covers (else refuse the request).
    clamp_output: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VirtualKey(Base):
    __tablename__ = "virtual_keys"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    parent_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_mask: Mapped[str] = mapped_column(String(40))
    # The secret a rotation replaced keeps working until previous_valid_until.
    previous_key_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    previous_valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled | disabled | deleted
    scopes: Mapped[list[str]] = mapped_column(JSON)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ip_allowlist: Mapped[list[str]] = mapped_column(JSON, default=list)
    limit_profile_id: Mapped[str | None] = mapped_column(ForeignKey("limit_profiles.id"), nullable=True)
    cost_center: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    environment: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    require_signature: Mapped[bool] = mapped_column(Boolean, default=False)
    # MCP server name -> tool-name patterns; null: no MCP server (keyplane.domain.mcp_access).
    mcp_servers: Mapped[dict[str, list[str]] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    request_count: Mapped[int] = mapped_column(Integer, default=0)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("org_id", "seq", name="uq_audit_events_org_seq"),
        Index("ix_audit_events_org_time", "org_id", "time"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    seq: Mapped[int] = mapped_column(Integer)
    # RFC 3339 text, exactly the string that was hashed (no round-trip through a datetime type).
    time: Mapped[str] = mapped_column(String(40))
    principal: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(100), index=True)
    target: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # Which hash rule (keyplane.domain.audit_chain): 1 legacy SHA-256, 2 HMAC under the chain key.
    hash_version: Mapped[int] = mapped_column(Integer, server_default="1")


class Provider(Base):
    __tablename__ = "providers"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_providers_org_name"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(String(500))
    # AES-GCM under the master key, the provider id as associated data; never returned.
    api_key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    api_key_mask: Mapped[str | None] = mapped_column(String(40), nullable=True)
    models: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    timeout_seconds: Mapped[float] = mapped_column(Float, default=60.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UsageEvent(Base):
    """One data-plane request, refused ones included. Written in batches off the request path."""

    __tablename__ = "usage_events"
    __table_args__ = (
        Index("ix_usage_events_org_time", "org_id", "time"),
        Index("ix_usage_events_key_time", "key_id", "time"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    parent_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(100))
    status: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(String(40))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)  # prompt-cache tokens included
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(Float)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cost_center: Mapped[str | None] = mapped_column(String(100), nullable=True)
    environment: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # MCP gateway requests: the server, the JSON-RPC method and the tool called (null elsewhere).
    mcp_server: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mcp_method: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tool: Mapped[str | None] = mapped_column(String(128), nullable=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)


def _shared_dimensions() -> list[Column[Any]]:
    """The dimensions both kinds of rollup table have (after ``org_id``, ``bucket`` and any key columns)."""
    return [
        Column("provider", String(64), primary_key=True),
        Column("model", String(200), primary_key=True),
        Column("cost_center", String(100), primary_key=True),
        Column("environment", String(100), primary_key=True),
        Column("endpoint", String(100), primary_key=True),
        Column("mcp_server", String(64), primary_key=True),
        Column("tool", String(128), primary_key=True),
        Column("status_class", String(3), primary_key=True),
    ]


def _measures() -> list[Column[Any]]:
    """What every rollup row counts: requests, outcomes, tokens, cost and a latency sketch."""
    return [
        Column("requests", BigInteger, nullable=False, default=0),
        Column("errors", BigInteger, nullable=False, default=0),  # refused + failed
        Column("refused", BigInteger, nullable=False, default=0),
        Column("failed", BigInteger, nullable=False, default=0),
        Column("input_tokens", BigInteger, nullable=False, default=0),
        Column("output_tokens", BigInteger, nullable=False, default=0),
        Column("cache_write_tokens", BigInteger, nullable=False, default=0),
        Column("cache_read_tokens", BigInteger, nullable=False, default=0),
        Column("cost_usd", Float, nullable=False, default=0.0),
        Column("latency_ms_sum", Float, nullable=False, default=0.0),
        *(Column(c, BigInteger, nullable=False, default=0) for c in latency_sketch.COLUMNS),
    ]


def _usage_rollup_table(name: str, key_index: tuple[str, ...] = ("key_id", "bucket")) -> Table:
    """Usage per minute, hour or day and dimension combination, upserted with each usage batch
    (keyplane/store/rollups.py). Absent dimensions are ``""``; ``bucket`` is the start in unix seconds.

    The dimensions are the primary key, and on SQLite the table is WITHOUT ROWID: rows are stored in
    (organization, bucket, …) order, so a summary's range read is contiguous (4x faster than rows
    scattered in insertion order, measured)."""
    return Table(
        name,
        Base.metadata,
        Column("org_id", String(40), primary_key=True),
        Column("bucket", BigInteger, primary_key=True),
        Column("key_id", String(40), primary_key=True),
        Column("parent_id", String(40), primary_key=True),
        *_shared_dimensions(),
        Column("refusal_code", String(40), primary_key=True),  # a refused request's code, "" for any other
        *_measures(),
        Index(f"ix_{name}_key", *key_index),
        Index(f"ix_{name}_bucket", "bucket"),
        sqlite_with_rowid=False,
    )


usage_rollups_minute = _usage_rollup_table("usage_rollups_minute")
usage_rollups_hour = _usage_rollup_table("usage_rollups_hour")
# The budget seed sums cost over a key's day rows: with the cost in the index it reads the index
# alone, not one table row per day and dimension combination (scattered on PostgreSQL by upserts).
usage_rollups_day = _usage_rollup_table("usage_rollups_day", ("key_id", "bucket", "cost_usd"))


def _usage_org_rollup_table(name: str) -> Table:
    """Usage per minute, hour or day of an organization without the key dimensions (and the refusal code):
    what summaries that neither filter nor group by key read (keyplane/store/rollups.py)."""
    return Table(
        name,
        Base.metadata,
        Column("org_id", String(40), primary_key=True),
        Column("bucket", BigInteger, primary_key=True),
        *_shared_dimensions(),
        *_measures(),
        Index(f"ix_{name}_bucket", "bucket"),
        sqlite_with_rowid=False,
    )


usage_rollups_org_minute = _usage_org_rollup_table("usage_rollups_org_minute")
usage_rollups_org_hour = _usage_org_rollup_table("usage_rollups_org_hour")
usage_rollups_org_day = _usage_org_rollup_table("usage_rollups_org_day")


class AlertRule(Base):
    """A condition on usage that, when met, is delivered as a signed webhook and recorded in the audit log."""

    __tablename__ = "alert_rules"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_alert_rules_org_name"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # budget | error_rate | spike
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # null: the whole organization
    mcp_server: Mapped[str | None] = mapped_column(String(64), nullable=True)  # only this MCP server's requests
    threshold: Mapped[float] = mapped_column(Float)
    window_minutes: Mapped[int] = mapped_column(Integer, default=15)
    min_requests: Mapped[int] = mapped_column(Integer, default=20)
    webhook_url: Mapped[str] = mapped_column(String(500))
    secret_sealed: Mapped[str] = mapped_column(Text)  # HMAC signing secret, sealed like provider secrets
    cooldown_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The last webhook delivery: delivered | failed (after every retry), when, how many attempts, last error.
    last_delivery_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_delivery_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_delivery_attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_delivery_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class McpServer(Base):
    """An upstream MCP server keyplane protects, served to key holders at /mcp/{name}."""

    __tablename__ = "mcp_servers"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_mcp_servers_org_name"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    transport: Mapped[str] = mapped_column(String(16), default="http")  # http | stdio
    url: Mapped[str] = mapped_column(String(500))  # "" for a stdio server
    # A stdio server: the argv keyplane runs, its environment (sealed like the headers) and working directory.
    command: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    env_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    env_names: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    cwd: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # Headers sent upstream (credentials): AES-GCM under the master key, the server id as associated data.
    headers_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    header_names: Mapped[list[str]] = mapped_column(JSON, default=list)  # shown instead of the values
    tool_scopes: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    timeout_seconds: Mapped[float] = mapped_column(Float, default=30.0)
    status: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled | disabled
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
