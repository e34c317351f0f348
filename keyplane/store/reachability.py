"""A store keyplane cannot open, said in one line with the fix (no traceback): the CLI and ``serve`` both
use it when the database is down, refuses the credentials, or does not exist."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

UNREACHABLE: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, DisconnectionError, DBAPIError,
                                                OSError, TimeoutError)


def _driver_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("asyncpg", "sqlite3", "aiosqlite"))


def store_problem(database_url: str, exc: BaseException) -> str | None:
    """One line if ``exc`` means the store cannot be opened; None for anything else (a real bug)."""
    if not (isinstance(exc, UNREACHABLE) or _driver_error(exc)):
        return None
    cause: BaseException = exc
    while cause.__cause__ is not None and not _driver_error(cause):
        cause = cause.__cause__
    detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()
    where = make_url(database_url).render_as_string(hide_password=True)
    reason = f"{type(cause).__name__}: {detail[0]}" if detail and detail[0] else type(cause).__name__
    return (f"cannot open the store at {where} ({reason[:300]}). Check KEYPLANE_DATABASE_URL (and "
            "KEYPLANE_DATABASE_SCHEMA), and that the database server is running and reachable")
