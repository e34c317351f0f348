"""Fixtures: the app on SQLite and, when KEYPLANE_TEST_POSTGRES_URL is set, on PostgreSQL too."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from keyplane.app import KeyplaneApp
from keyplane.config import Settings

POSTGRES_URL = os.environ.get("KEYPLANE_TEST_POSTGRES_URL")
# PostgreSQL deployments must share one master key (no per-machine key file); tests use a fixed one.
TEST_MASTER_KEY = "a2V5cGxhbmUtdGVzdC1tYXN0ZXIta2V5LTMyLWJ5dGU="
REDIS_URL = os.environ.get("KEYPLANE_TEST_REDIS_URL")
# "distributed": PostgreSQL plus Redis for limits, spend, brake and change notices (issue #7's mode).
BACKENDS = ["sqlite"] + (["postgresql"] if POSTGRES_URL else []) + (
    ["distributed"] if POSTGRES_URL and REDIS_URL else [])
if os.environ.get("CI") and not (POSTGRES_URL and REDIS_URL):
    raise RuntimeError("CI must set KEYPLANE_TEST_POSTGRES_URL and KEYPLANE_TEST_REDIS_URL so the suite runs "
                       "against PostgreSQL and Redis too")


# Tests that run keyplane as real server processes. Under pytest-xdist (`make test` runs two workers)
# they share one group, so they run one after another on one worker and their timing-sensitive
# measurements (revocation delay, shared limits) never compete with each other for the two cores.
PROCESS_TEST_MODULES = frozenset({"test_distributed", "test_quickstart_process", "test_connect",
                                  "test_forwarded_for_process", "test_mcp_gateway_everything",
                                  "test_mcp_stdio_process"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in PROCESS_TEST_MODULES:
            item.add_marker(pytest.mark.xdist_group("processes"))


def downgrader(db: Any, revision: str) -> Any:
    """A function for ``conn.run_sync`` that takes a migrated test store down to ``revision`` (the migration
    tests' way to build a store "as an older keyplane left it")."""
    from alembic import command

    from keyplane.store import migrate

    def downgrade(connection: Any) -> None:
        cfg = migrate.alembic_config(db.url)
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)

    return downgrade


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


async def drop_schema(schema: str) -> None:
    assert POSTGRES_URL
    engine = create_async_engine(POSTGRES_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


async def drop_redis_namespace(namespace: str) -> None:
    import redis.asyncio as aioredis

    assert REDIS_URL
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def settings_factory(backend: str, tmp_path: Path) -> AsyncIterator[Any]:
    """Makes Settings for this test's store; every call shares the same store (same schema/home)."""
    schema = f"kp_test_{secrets.token_hex(6)}"

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"home": tmp_path / "home", "change_poll_seconds": 0.2, "last_used_flush_seconds": 0.2}
        if backend in ("postgresql", "distributed"):
            base.update(database_url=POSTGRES_URL, database_schema=schema, master_key=TEST_MASTER_KEY)
        if backend == "distributed":
            base.update(redis_url=REDIS_URL, redis_namespace=schema)
        base.update(overrides)
        return Settings(**base)

    yield make
    if backend in ("postgresql", "distributed"):
        await drop_schema(schema)
    if backend == "distributed":
        await drop_redis_namespace(schema)


@pytest.fixture
async def app(settings_factory: Any) -> AsyncIterator[KeyplaneApp]:
    application = KeyplaneApp(settings_factory())
    await application.startup()
    yield application
    await application.shutdown()


@pytest.fixture
async def client(app: KeyplaneApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
        yield c


@pytest.fixture
def admin_token(app: KeyplaneApp) -> str:
    assert app.bootstrap is not None and app.bootstrap.admin_token
    return app.bootstrap.admin_token


@pytest.fixture
def admin(admin_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


async def create_key(client: httpx.AsyncClient, headers: dict[str, str], **fields: Any) -> tuple[dict[str, Any], str]:
    fields.setdefault("name", "test-key")
    resp = await client.post("/api/v1/keys", json=fields, headers=headers)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return body["key"], body["secret"]


async def verify(
    client: httpx.AsyncClient, headers: dict[str, str], key: str, **fields: Any
) -> dict[str, Any]:
    resp = await client.post("/api/v1/keys/verify", json={"key": key, **fields}, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def create_sa(
    client: httpx.AsyncClient, headers: dict[str, str], scopes: list[str], name: str = "agent"
) -> tuple[dict[str, Any], str]:
    resp = await client.post("/api/v1/service-accounts", json={"name": name, "scopes": scopes}, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["service_account"], resp.json()["token"]


def count_store_loads(app: KeyplaneApp, delay: float = 0.0) -> list[str]:
    """Record every key lookup that reaches the store (a cache miss), optionally slowed down."""
    import asyncio

    loads: list[str] = []
    real = app.kp._load_key

    async def counting(digest: str):  # type: ignore[no-untyped-def]
        loads.append(digest)
        if delay:
            await asyncio.sleep(delay)
        return await real(digest)

    app.kp._load_key = counting  # type: ignore[method-assign]
    return loads


@pytest.fixture
async def store_env(backend: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """Environment for real keyplane processes sharing one store (SQLite home or a PostgreSQL schema)."""
    env = {"KEYPLANE_HOME": str(tmp_path / "home"), "KEYPLANE_CHANGE_POLL_SECONDS": "0.2"}
    schema = f"kp_test_{secrets.token_hex(6)}"
    if backend in ("postgresql", "distributed"):
        assert POSTGRES_URL
        env.update(KEYPLANE_DATABASE_URL=POSTGRES_URL, KEYPLANE_DATABASE_SCHEMA=schema,
                   KEYPLANE_MASTER_KEY=TEST_MASTER_KEY)
    if backend == "distributed":
        assert REDIS_URL
        env.update(KEYPLANE_REDIS_URL=REDIS_URL, KEYPLANE_REDIS_NAMESPACE=schema)
    yield env
    if backend in ("postgresql", "distributed"):
        await drop_schema(schema)
    if backend == "distributed":
        await drop_redis_namespace(schema)
