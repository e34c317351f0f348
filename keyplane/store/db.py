"""Engines and sessions for SQLite (embedded) and PostgreSQL (distributed)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from itertools import chain
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_MMAP_BYTES = 256 * 1024 * 1024

# The sqlite3 module binds None as NULL only after asking None to adapt itself, which raises and formats two
# AttributeErrors per None parameter (~3,000 instructions each; a usage row has four): a fifth of the usage
# writer's instructions. Registered, None is looked up in the adapter table and bound as NULL, as before.
# (The adapter returns None for None: ``{}.get`` is a C function that does so.) Adapters of int, float or
# str would slow every parameter down; an adapter of None slows nothing.
sqlite3.register_adapter(type(None), {}.get)


def executemany_values(cursor: Any, sql_of: Callable[[int], str], rows: list[tuple[Any, ...]], chunk: int) -> None:
    """Execute ``sql_of(n)``, a statement of ``n`` rows of parameters (``INSERT … VALUES (…), (…)``), over
    ``rows``: ``chunk`` rows a statement, the remainder as halves (chunk a power of two: at most log2(chunk)
    more statements, so only a few statement texts ever exist and each is prepared once, then cached by
    the driver). Parameters per statement stay under SQLite's oldest limit (999) if chunk × columns does."""
    flat = chain.from_iterable
    done = len(rows) - len(rows) % chunk
    if done:
        cursor.executemany(sql_of(chunk), [tuple(flat(rows[i:i + chunk])) for i in range(0, done, chunk)])
    while done < len(rows):
        while chunk > len(rows) - done:
            chunk //= 2
        cursor.execute(sql_of(chunk), tuple(flat(rows[done:done + chunk])))
        done += chunk


def _sqlite_setup(sync_engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over transaction control from the driver so that BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Reads of scattered pages (rollup ranges, key lookups) as memory reads, not one pread() each.
        cur.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the database lock up front: one writer at a time across every
        # process (server and CLI), so read-then-write sequences such as appending to the
        # audit chain can never interleave.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _make_engine(url: str, *, schema: str | None, immediate: bool) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_setup(engine.sync_engine, immediate=immediate)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True,
                               connect_args=_pg_connect_args(schema))


def _pg_connect_args(schema: str | None) -> dict[str, Any]:
    return {"server_settings": {"search_path": schema}} if schema else {}


class Database:
    """``write()`` for transactions that change state, ``read()`` for everything else."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.schema = schema
        self.write_engine = _make_engine(url, schema=schema, immediate=True)
        self.read_engine = (
            _make_engine(url, schema=schema, immediate=False) if self.is_sqlite else self.write_engine
        )
        # Every session's ``info`` holds this dict: what writers need besides the store, such as the
        # audit chain key (``audit_chain_key``: a callable the owner of the master key sets).
        self.session_info: dict[str, Any] = {}
        self._write_sessions = async_sessionmaker(self.write_engine, expire_on_commit=False, info=self.session_info)
        self._read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False, info=self.session_info)
        # SQLite lookups on the hot path's cache misses run whole in one worker thread: one thread hop
        # instead of one per statement (aiosqlite's way), which is most of a miss's cost.
        self._sync_reads: Engine | None = None
        self._sync_writes: Engine | None = None
        self._sync_executor: ThreadPoolExecutor | None = None
        if self.is_sqlite:
            self._sync_reads = create_engine(
                url.replace("sqlite+aiosqlite", "sqlite", 1), connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
            )
            _sqlite_setup(self._sync_reads, immediate=False)
            self._sync_writes = create_engine(
                url.replace("sqlite+aiosqlite", "sqlite", 1), connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
            )
            _sqlite_setup(self._sync_writes, immediate=True)
            self._sync_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="keyplane-read")
        # PostgreSQL reads that are one statement (a request path's budget seed) run outside a transaction:
        # a statement is its own snapshot, so BEGIN and COMMIT would be two round trips for nothing, and the
        # checkout's pre-ping is one round trip (";") instead of three (SQLAlchemy pings non-autocommit
        # asyncpg connections inside BEGIN … ROLLBACK). Its own small pool: a connection's isolation level
        # is set at checkout, after the ping.
        self.statement_engine: AsyncEngine | None = None
        if not self.is_sqlite:
            self.statement_engine = create_async_engine(
                url, pool_size=4, max_overflow=6, pool_pre_ping=True, isolation_level="AUTOCOMMIT",
                connect_args=_pg_connect_args(schema))

    async def _in_thread(self, engine: Engine, fn: Callable[[Session], T]) -> T:
        def job() -> T:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return await asyncio.get_running_loop().run_in_executor(self._sync_executor, job)

    async def run_read(self, fn: Callable[[Session], T]) -> T:
        """Run a synchronous read ``fn(session)`` in one transaction, the cheapest way for this store."""
        if self._sync_reads is not None:
            return await self._in_thread(self._sync_reads, fn)
        async with self.read() as session:
            return await session.run_sync(fn)

    async def run_statement(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)``, a read of ONE statement, the cheapest way for this store: on SQLite one
        worker-thread hop (as ``run_read``); on PostgreSQL without a transaction (``statement_engine``):
        with the checkout's ping, two round trips (three the first time a connection meets the statement:
        asyncpg prepares it). More than one statement would not share a snapshot: use ``run_read``."""
        if self.statement_engine is None:
            return await self.run_read(lambda s: fn(s.connection()))
        async with self.statement_engine.connect() as conn:
            return await conn.run_sync(fn)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        async with self._write_sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._read_sessions() as session, session.begin():
            yield session

    async def run_write(self, fn: Callable[[Session], T]) -> T:
        """Like ``run_read`` for bulk writes (usage batches): on SQLite, statement building and the
        insert happen in a worker thread, not on the event loop serving requests."""
        if self._sync_writes is not None:
            return await self._in_thread(self._sync_writes, fn)
        async with self.write() as session:
            return await session.run_sync(fn)

    async def run_dbapi_write(self, fn: Callable[[Any], T]) -> T:
        """SQLite only: ``fn(cursor)`` on a raw pooled connection in the worker thread, inside
        ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back if it raises): no Session, no SQLAlchemy
        statement handling, for the usage writer's few large statements a second. The driver's errors
        come out as SQLAlchemy's (``OperationalError`` for a busy store…), as from ``run_write``."""
        engine = self._sync_writes
        assert engine is not None, "SQLite only"

        def job() -> T:
            conn = engine.raw_connection()
            try:
                cursor = conn.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                    result = fn(cursor)
                    cursor.execute("COMMIT")
                    return result
                except sqlite3.Error as e:
                    raise exc.DBAPIError.instance(None, None, e, sqlite3.Error) from e
                finally:
                    if conn.driver_connection.in_transaction:
                        conn.driver_connection.rollback()
                    cursor.close()
            finally:
                conn.close()

        return await asyncio.get_running_loop().run_in_executor(self._sync_executor, job)

    async def dispose(self) -> None:
        if self._sync_writes is not None:
            self._sync_writes.dispose()
        if self._sync_reads is not None:
            self._sync_reads.dispose()
        if self._sync_executor is not None:
            self._sync_executor.shutdown(wait=False)
        if self.statement_engine is not None:
            await self.statement_engine.dispose()
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()
