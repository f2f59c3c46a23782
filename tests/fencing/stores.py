"""One async face for every kind of connection ``ostinato.fenced`` takes, and the checker.

A ``Store`` owns a data table and a fence table of its own (unique names, so
tests can share a database), opens connections of its kind and drives them
step by step: a sync connection's steps run in a worker thread, so one test
can hold a stale transaction open while a newer holder's waits or commits.
Every fenced writer inserts ``(fence, writer)`` into the data table, whose
sequence (SQLite's AUTOINCREMENT under the write lock, a PostgreSQL
``bigserial`` taken after the fence row's lock) is the commit order.
"""

# ruff: noqa: S608 (the SQL is built from the test's own table names and integers)

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import ostinato
from ostinato.fencing import Fenced
from tests.servers import postgres_url

LOOP = "app:loop"

#: Every kind of connection, as (kind, backend).
KINDS = [
    ("sqlite3", "sqlite"),
    ("psycopg", "postgres"),
    ("psycopg-async", "postgres"),
    ("sqlalchemy", "sqlite"),
    ("sqlalchemy", "postgres"),
    ("sqlalchemy-async", "sqlite"),
    ("sqlalchemy-async", "postgres"),
    ("session", "postgres"),
    ("async-session", "sqlite"),
]


def kind_params() -> list[Any]:
    """``KINDS`` as pytest parameters, the PostgreSQL ones marked ``backend``."""
    return [
        pytest.param(kind, backend, id=f"{kind}-{backend}",
                     marks=[pytest.mark.backend] if backend == "postgres" else [])
        for kind, backend in KINDS
    ]


def violations(rows: Sequence[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Each committed row (in commit order) whose fence is smaller than one committed before it,
    as (its sequence number, the greater fence before it)."""
    found, highest = [], None
    for seq, fence, _ in sorted(rows):
        if highest is not None and fence < highest:
            found.append((seq, highest))
        highest = fence if highest is None else max(highest, fence)
    return found


def postgres_dsn() -> str:
    return postgres_url().split("?", 1)[0]


class Store:
    """A data table and a fence table on one backend, and connections of one kind to them."""

    def __init__(self, kind: str, backend: str, tmp_path: Path) -> None:
        tag = uuid.uuid4().hex[:10]
        self.kind, self.backend = kind, backend
        self.data, self.fences = f"fence_data_{tag}", f"fence_rows_{tag}"
        self.is_async = "async" in kind
        self.path = tmp_path / "fencing.db"
        self.dsn = postgres_dsn() if backend == "postgres" else ""
        self.engines: list[Any] = []
        self.opened = 0
        serial = "bigserial" if backend == "postgres" else "INTEGER"
        auto = "" if backend == "postgres" else " AUTOINCREMENT"
        self.admin(f"CREATE TABLE {self.data} (seq {serial} PRIMARY KEY{auto}, fence bigint, writer text)")

    # -- outside any fenced transaction ---------------------------------------------------------

    def admin(self, sql: str) -> list[tuple[Any, ...]]:
        """Run one statement on a connection of its own, committed."""
        if self.backend == "sqlite":
            with sqlite3.connect(self.path, isolation_level=None) as db:
                db.execute("PRAGMA journal_mode=WAL")
                return db.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as pg:
            cursor = pg.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def rows(self) -> list[tuple[int, int, str]]:
        """The committed rows of the data table: (sequence, fence, writer)."""
        found = self.admin(f"SELECT seq, fence, writer FROM {self.data}")
        return [(int(seq), int(fence), str(writer)) for seq, fence, writer in found]

    def recorded(self) -> int | None:
        """The fence recorded for ``LOOP``, if any."""
        try:
            found = self.admin(f"SELECT fence FROM {self.fences} WHERE name = '{LOOP}'")
        except Exception:  # the table is not there yet
            return None
        return int(found[0][0]) if found else None

    def drop(self) -> None:
        if not self.is_async:  # async engines are disposed of with their connections
            for engine in self.engines:
                engine.dispose()
        if self.backend == "postgres":
            self.admin(f"DROP TABLE IF EXISTS {self.data}, {self.fences}")

    # -- connections --------------------------------------------------------------------------

    async def _call(self, step: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(step)

    async def connect(self) -> Any:
        self.opened += 1
        kind, sqlite = self.kind, self.backend == "sqlite"
        if kind == "sqlite3":
            return await self._call(lambda: sqlite3.connect(self.path, timeout=10, check_same_thread=False))
        if kind == "psycopg":
            import psycopg

            return await self._call(lambda: psycopg.connect(self.dsn))
        if kind == "psycopg-async":
            import psycopg

            return await psycopg.AsyncConnection.connect(self.dsn)
        if self.is_async:
            from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

            url = f"sqlite+aiosqlite:///{self.path}" if sqlite else self.dsn.replace(
                "postgresql://", "postgresql+psycopg://", 1)
            engine = create_async_engine(url, connect_args={"timeout": 10} if sqlite else {})
            self.engines.append(engine)
            return AsyncSession(engine) if kind == "async-session" else await engine.connect()
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        url = f"sqlite:///{self.path}" if sqlite else self.dsn.replace(
            "postgresql://", "postgresql+psycopg://", 1)
        args = {"timeout": 10, "check_same_thread": False} if sqlite else {}
        engine = create_engine(url, connect_args=args)
        self.engines.append(engine)
        return Session(engine) if kind == "session" else await self._call(engine.connect)

    async def close(self, conn: Any) -> None:
        if self.is_async:
            await conn.close()
            self.opened -= 1
            if not self.opened:  # the last one: the engines' pools go too
                for engine in self.engines:
                    await engine.dispose()
        else:
            await self._call(conn.close)

    async def execute(self, conn: Any, sql: str) -> None:
        """One statement on ``conn``, in whatever transaction it is in."""
        if self.kind in ("sqlite3", "psycopg"):
            await self._call(lambda: conn.execute(sql))
        elif self.kind == "psycopg-async":
            await conn.execute(sql)
        else:
            from sqlalchemy import text

            if self.is_async:
                await conn.execute(text(sql))
            else:
                await self._call(lambda: conn.execute(text(sql)))

    async def begin(self, conn: Any) -> None:
        """Open a plain transaction on ``conn`` (its first statement reads the data table)."""
        if self.kind == "sqlite3":
            await self.execute(conn, "BEGIN")
        elif self.kind.startswith("sqlalchemy") or "session" in self.kind:
            if self.is_async:
                await conn.begin()
            else:
                await self._call(conn.begin)
        if self.backend == "postgres":  # psycopg begins before its first statement
            await self.execute(conn, f"SELECT count(*) FROM {self.data}")

    async def rollback(self, conn: Any) -> None:
        if self.is_async:
            await conn.rollback()
        else:
            await self._call(conn.rollback)

    async def commit(self, conn: Any) -> None:
        if self.is_async:
            await conn.commit()
        else:
            await self._call(conn.commit)

    async def insert(self, conn: Any, fence: int, writer: str) -> None:
        await self.execute(conn, f"INSERT INTO {self.data} (fence, writer) VALUES ({fence}, '{writer}')")

    # -- fenced transactions ------------------------------------------------------------------

    def fenced(self, conn: Any, fence: int) -> Fenced:
        return ostinato.fenced(conn, loop=LOOP, fence=fence, table=self.fences)

    async def enter(self, block: Fenced) -> None:
        if self.is_async:
            await block.__aenter__()
        else:
            await self._call(block.__enter__)

    async def leave(self, block: Fenced, error: BaseException | None = None) -> None:
        kind = None if error is None else type(error)
        if self.is_async:
            await block.__aexit__(kind, error, None)
        else:
            await self._call(lambda: block.__exit__(kind, error, None))

    async def write(self, conn: Any, fence: int, writer: str) -> None:
        """One whole fenced transaction that inserts a row; raises ``StaleFence`` if refused."""
        block = self.fenced(conn, fence)
        await self.enter(block)
        try:
            await self.insert(conn, fence, writer)
        except BaseException as exc:
            await self.leave(block, exc)
            raise
        await self.leave(block)
