"""The connections ``ostinato.fenced`` takes: one thin adapter per kind, told apart by type.

Each adapter says whether its connection is inside a transaction, begins one,
runs a statement and returns its first row, commits and rolls back; the
sequence of statements itself is ``ostinato.fencing``'s, the same for all.
Optional packages are never imported here unless the caller's connection
comes from them.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys
from typing import Any, Protocol

from ostinato.errors import ConfigurationError

_SUPPORTED = (
    "a sqlite3 or psycopg (3) connection, a SQLAlchemy Connection or Session (sync or async), "
    "or a Django connection"
)

Row = tuple[Any, ...] | None
Params = dict[str, object]


class SyncAdapter(Protocol):
    dialect: str
    pyformat: bool
    key: object

    def in_transaction(self) -> bool: ...
    def begin(self) -> None: ...
    def fetch(self, sql: str, params: Params | None = None) -> Row: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...


class AsyncAdapter(Protocol):
    dialect: str
    pyformat: bool
    key: object

    def in_transaction(self) -> bool: ...
    async def begin(self) -> None: ...
    async def fetch(self, sql: str, params: Params | None = None) -> Row: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...


class _Sqlite3:
    """The standard library's sqlite3, in any ``isolation_level``; nothing of it is changed."""

    dialect, pyformat = "sqlite", False

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.key: object = None

    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin(self) -> None:
        # The write lock from the start: a newer holder's transaction waits for this one.
        self.conn.execute("BEGIN IMMEDIATE")

    def fetch(self, sql: str, params: Params | None = None) -> Row:
        row: Row = self.conn.execute(sql, params or {}).fetchone()
        return row

    def commit(self) -> None:
        if not self.conn.in_transaction:
            raise ConfigurationError(
                "the transaction was committed or rolled back inside ostinato.fenced(): "
                "leave that to the with block"
            )
        # Statements, not conn.commit(): those do nothing under Python 3.12's autocommit=True.
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class _Psycopg:
    """psycopg 3, in autocommit mode or not; its own ``transaction()`` blocks are joined."""

    dialect, pyformat = "postgresql", True

    def __init__(self, conn: Any) -> None:
        self.conn, self.key = conn, conn
        from psycopg.pq import TransactionStatus
        from psycopg.rows import tuple_row

        self.idle, self.tuple_row = TransactionStatus.IDLE, tuple_row

    def in_transaction(self) -> bool:
        return bool(self.conn.info.transaction_status != self.idle)

    def begin(self) -> None:
        if self.conn.autocommit:  # otherwise psycopg begins before the first statement
            self.conn.execute("BEGIN")

    def fetch(self, sql: str, params: Params | None = None) -> Row:
        with self.conn.cursor(row_factory=self.tuple_row) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if cursor.description is not None else None

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class AsyncPsycopg:
    dialect, pyformat = "postgresql", True

    def __init__(self, conn: Any) -> None:
        self.conn, self.key = conn, conn
        from psycopg.pq import TransactionStatus
        from psycopg.rows import tuple_row

        self.idle, self.tuple_row = TransactionStatus.IDLE, tuple_row

    def in_transaction(self) -> bool:
        return bool(self.conn.info.transaction_status != self.idle)

    async def begin(self) -> None:
        if self.conn.autocommit:
            await self.conn.execute("BEGIN")

    async def fetch(self, sql: str, params: Params | None = None) -> Row:
        async with self.conn.cursor(row_factory=self.tuple_row) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchone() if cursor.description is not None else None

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()


class _Alchemy:
    """A SQLAlchemy ``Connection`` or ``Session``: both begin, commit and roll back alike."""

    pyformat = False

    def __init__(self, conn: Any, engine: Any) -> None:
        self.conn, self.key, self.dialect = conn, engine, engine.dialect.name
        from sqlalchemy import text

        self.text = text

    def in_transaction(self) -> bool:
        return bool(self.conn.in_transaction())

    def begin(self) -> None:
        self.conn.begin()

    def fetch(self, sql: str, params: Params | None = None) -> Row:
        result = self.conn.execute(self.text(sql), params or {})
        row = result.first() if result.returns_rows else None
        return None if row is None else tuple(row)

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class AsyncAlchemy:
    """A SQLAlchemy ``AsyncConnection`` or ``AsyncSession``."""

    pyformat = False

    def __init__(self, conn: Any, engine: Any) -> None:
        self.conn, self.key, self.dialect = conn, engine, engine.dialect.name
        from sqlalchemy import text

        self.text = text

    def in_transaction(self) -> bool:
        return bool(self.conn.in_transaction())

    async def begin(self) -> None:
        await self.conn.begin()

    async def fetch(self, sql: str, params: Params | None = None) -> Row:
        result = await self.conn.execute(self.text(sql), params or {})
        row = result.first() if result.returns_rows else None
        return None if row is None else tuple(row)

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()


class _Django:
    """A Django database connection: the transaction is an ``atomic()`` block of its alias."""

    pyformat = True

    def __init__(self, conn: Any) -> None:
        db = importlib.import_module("django.db")
        self.transaction, self.conn = db.transaction, db.connections[conn.alias]
        self.key, self.dialect = self.conn, self.conn.vendor
        self.atomic: Any = None

    def in_transaction(self) -> bool:
        return bool(self.conn.in_atomic_block or not self.conn.get_autocommit())

    def begin(self) -> None:
        self.atomic = self.transaction.atomic(using=self.conn.alias)
        self.atomic.__enter__()

    def fetch(self, sql: str, params: Params | None = None) -> Row:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if cursor.description is not None else None

    def commit(self) -> None:
        self.atomic.__exit__(None, None, None)

    def rollback(self) -> None:
        self.transaction.set_rollback(True, using=self.conn.alias)
        self.atomic.__exit__(None, None, None)


def adapter_for(conn: object) -> SyncAdapter | AsyncAdapter:
    """The adapter for ``conn``, told apart without importing any optional package."""
    if isinstance(conn, sqlite3.Connection):
        return _Sqlite3(conn)
    modules = sys.modules
    if (psycopg := modules.get("psycopg")) is not None:
        if isinstance(conn, psycopg.Connection):
            return _Psycopg(conn)
        if isinstance(conn, psycopg.AsyncConnection):
            return AsyncPsycopg(conn)
    if (orm := modules.get("sqlalchemy.orm")) is not None and isinstance(conn, orm.Session):
        return _Alchemy(conn, conn.get_bind())
    if (engine := modules.get("sqlalchemy.engine")) is not None:
        if isinstance(conn, engine.Connection):
            return _Alchemy(conn, conn.engine)
        if isinstance(conn, engine.Engine):
            raise ConfigurationError(
                "ostinato.fenced() takes a Connection (engine.connect()) or a Session, not an Engine"
            )
    if (aio := modules.get("sqlalchemy.ext.asyncio")) is not None:
        if isinstance(conn, aio.AsyncSession):
            return AsyncAlchemy(conn, conn.sync_session.get_bind())
        if isinstance(conn, aio.AsyncConnection):
            return AsyncAlchemy(conn, conn.sync_engine)
        if isinstance(conn, aio.AsyncEngine):
            raise ConfigurationError(
                "ostinato.fenced() takes an AsyncConnection (engine.connect()) or an AsyncSession, "
                "not an AsyncEngine"
            )
    if "django.db" in modules and type(conn).__module__.startswith(("django.db", "django.utils")):
        return _Django(conn)
    if type(conn).__module__.split(".")[0] == "redis":
        raise ConfigurationError("for Redis use ostinato.redis_fenced(client, ctx), not fenced()")
    raise ConfigurationError(
        f"ostinato.fenced() cannot fence a {type(conn).__module__}.{type(conn).__qualname__}; "
        f"give it {_SUPPORTED}"
    )
