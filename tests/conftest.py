"""Fixtures: the app on SQLite and, when KEYPLANE_TEST_POSTGRES_URL is set, on PostgreSQL too."""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import shutil
import subprocess
import tempfile
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


# Tests that run keyplane as real server processes. Under pytest-xdist (`make test` runs two workers) each
# group runs one module after another on one worker, so no two of its tests compete with each other for the
# two cores. Two groups, so that the long process tests split over both workers instead of making one the
# long pole: "processes" holds the timing-sensitive server measurements (revocation delay, shared limits,
# the brake), which never overlap one another; "cli-processes" the quickstart and `keyplane connect`.
PROCESS_TEST_GROUPS = {
    "test_distributed": "processes", "test_forwarded_for_process": "processes",
    "test_mcp_gateway_everything": "processes", "test_mcp_stdio_process": "processes",
    "test_quickstart_process": "cli-processes", "test_connect": "cli-processes",
}
PROCESS_TEST_MODULES = frozenset(PROCESS_TEST_GROUPS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fresh_store: the test's store starts empty (no migrated-store copy), "
                                       "for tests of migration and of a first start")


def _process_group(nodeid: str) -> str | None:
    module = nodeid.partition("::")[0].rpartition("/")[2].removesuffix(".py")
    return PROCESS_TEST_GROUPS.get(module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadgroup, with the groups above formed here on the controller. xdist's own way (the
    xdist_group mark turned into an "@group" node-id suffix on the worker) has no effect under pytest 9,
    whose node ids are no longer the ``_nodeid`` attribute xdist sets: the group silently never formed,
    and process tests ran on both workers at once."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ProcessGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _process_group(nodeid) or super()._split_scope(nodeid)

    return ProcessGroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # the mark too, for tools that read it
        group = _process_group(item.nodeid)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


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


# A migrated store, copied: running every migration per test costs 2-5 s of Alembic and DDL on PostgreSQL
# (serialized by keyplane's migration advisory lock across both xdist workers), 0.2 s on SQLite. Each
# worker migrates one store once; every test then starts from a copy of it, which is the same store
# `upgrade` would have made (the app finds it current and skips Alembic). Tests of migration itself and of a
# first start on an empty store opt out with @pytest.mark.fresh_store.
_migrated: dict[str, Any] = {}


async def _migrated_sqlite() -> Path:
    if "sqlite" not in _migrated:
        from keyplane.store import migrate
        from keyplane.store.db import Database

        folder = tempfile.mkdtemp(prefix="kp-migrated-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = Path(folder) / "keyplane.db"
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await migrate.upgrade(db)
        finally:
            await db.dispose()
        _migrated["sqlite"] = path
    return Path(_migrated["sqlite"])


def _pg_dump(schema: str) -> str:
    assert POSTGRES_URL
    dump = subprocess.run(["pg_dump", "--dbname", POSTGRES_URL.replace("+asyncpg", "", 1), "--schema", schema,
                           "--no-owner", "--no-privileges", "--inserts"], capture_output=True, text=True, timeout=60)
    if dump.returncode != 0:
        raise RuntimeError(dump.stderr)
    # Session settings (search_path '' among them) and psql meta-commands stay out: plain DDL and rows only.
    return "\n".join(line for line in dump.stdout.splitlines()
                     if line and not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\")))


async def _migrated_postgres() -> tuple[str, str] | None:
    """The SQL that rebuilds a migrated schema and the name to replace in it; None without pg_dump (or with
    one older than the server), in which case each test migrates its own schema as before."""
    if "postgresql" not in _migrated:
        from keyplane.store import migrate
        from keyplane.store.db import Database

        assert POSTGRES_URL
        template = f"kp_migrated_{secrets.token_hex(6)}"
        db = Database(POSTGRES_URL, template)
        try:
            await migrate.upgrade(db)
        finally:
            await db.dispose()
        try:
            _migrated["postgresql"] = (await asyncio.to_thread(_pg_dump, template), template) \
                if shutil.which("pg_dump") else None
        except (RuntimeError, subprocess.SubprocessError):
            _migrated["postgresql"] = None
        await drop_schema(template)
    result: tuple[str, str] | None = _migrated["postgresql"]
    return result


async def copy_migrated_store(backend: str, home: Path, schema: str) -> None:
    """Give this test's store (its SQLite home, or its PostgreSQL schema) the migrated schema."""
    if backend == "sqlite":
        migrated_db = await _migrated_sqlite()
        os.makedirs(home, mode=0o700, exist_ok=True)
        shutil.copyfile(migrated_db, home / "keyplane.db")
        return
    migrated = await _migrated_postgres()
    if migrated is None:
        return
    import asyncpg

    assert POSTGRES_URL
    sql, template = migrated
    conn = await asyncpg.connect(POSTGRES_URL.replace("+asyncpg", "", 1))
    try:
        async with conn.transaction():
            await conn.execute(sql.replace(template, schema))
    finally:
        await conn.close()


def _fresh_store(request: pytest.FixtureRequest) -> bool:
    return request.node.get_closest_marker("fresh_store") is not None


@pytest.fixture
async def settings_factory(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Makes Settings for this test's store; every call shares the same store (same schema/home)."""
    schema = f"kp_test_{secrets.token_hex(6)}"
    if not _fresh_store(request):
        await copy_migrated_store(backend, tmp_path / "home", schema)

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
async def store_env(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[dict[str, str]]:
    """Environment for real keyplane processes sharing one store (SQLite home or a PostgreSQL schema)."""
    env = {"KEYPLANE_HOME": str(tmp_path / "home"), "KEYPLANE_CHANGE_POLL_SECONDS": "0.2"}
    schema = f"kp_test_{secrets.token_hex(6)}"
    if not _fresh_store(request):
        await copy_migrated_store(backend, tmp_path / "home", schema)
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
