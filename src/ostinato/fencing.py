"""Fenced writes: a stale holder's whole transaction fails, so the store itself refuses it.

``fenced(conn, ctx)`` wraps the caller's own transaction. At its start, before
any of the caller's writes, it records the pass's fence for the loop in a small
table (``ostinato_fences``: one row per lease name), unless a greater fence is
recorded there already; then the transaction is rolled back and ``StaleFence``
raised. The row stays locked to the end of the transaction (PostgreSQL's row
lock, SQLite's write lock), so a newer holder's transaction waits for a stale
one that got in first: fences of committed transactions never decrease in
commit order.

One sequence of statements (``_open_sync`` and ``_open_async``) runs over thin
adapters, one per kind of connection (sqlite3, psycopg 3, SQLAlchemy, Django),
kept in ``ostinato.fencing_adapters``.
The Redis form, ``redis_fenced``, lives in ``ostinato.fencing_redis``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from ostinato.errors import ConfigurationError, StaleFence
from ostinato.fencing_adapters import (
    AsyncAdapter,
    AsyncAlchemy,
    AsyncPsycopg,
    Params,
    SyncAdapter,
    adapter_for,
)

if TYPE_CHECKING:
    from ostinato.loop import Pass

__all__ = ["Fenced", "fence_of", "fenced"]

DEFAULT_TABLE = "ostinato_fences"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Serializes the first creation of the table on PostgreSQL, where two sessions running
# CREATE TABLE IF NOT EXISTS at once can fail on the catalog's unique index.
_CREATE_LOCK = 0x6F7374696E61746F  # "ostinato"

#: Whether the fence is compared before it is recorded. Only the tests turn it off,
#: to show that their checkers find the violations the comparison prevents.
_CHECK = True


def fence_of(ctx: Pass | None, loop: str | None, fence: int | None) -> tuple[str, int]:
    """The lease name and fence to record: from ``ctx``, or from ``loop`` and ``fence``."""
    if ctx is not None and (loop is not None or fence is not None):
        raise ConfigurationError(
            "give either the pass (fenced(conn, ctx)) or loop= and fence=, not both"
        )
    if ctx is not None:
        loop, fence = ctx.lease_name, ctx.fence
    elif loop is None or fence is None:
        raise ConfigurationError(
            "fenced() needs the pass, fenced(conn, ctx), or both loop= and fence= "
            "(e.g. loop='app:loop', fence=7) for code outside a pass"
        )
    if not isinstance(loop, str) or not loop:
        raise ConfigurationError(f"loop= must be the loop's lease name such as 'app:loop', not {loop!r}")
    if isinstance(fence, bool) or not isinstance(fence, int) or fence < 0:
        raise ConfigurationError(f"fence= must be the lease's fence, a whole number >= 0, not {fence!r}")
    return loop, fence


def _identifier(what: str, value: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ConfigurationError(
            f"{what}={value!r} is not a plain SQL name: use letters, digits and '_' "
            "(not starting with a digit, at most 63 characters)"
        )
    return value


@dataclass(frozen=True)
class _Sql:
    """The statements for one dialect, table and parameter style."""

    create: str
    record: str  # returns the recorded fence, or no row when a greater one is there
    current: str
    lock: str


@functools.lru_cache(maxsize=64)
def _sql(dialect: str, table: str, pyformat: bool, check: bool) -> _Sql:
    # Only names checked by _identifier are put into the text; values go as parameters.
    name, fence = ("%(name)s", "%(fence)s") if pyformat else (":name", ":fence")
    kind = "bigint" if dialect == "postgresql" else "INTEGER"
    only_newer = " WHERE f.fence <= excluded.fence" if check else ""
    return _Sql(
        create=f"CREATE TABLE IF NOT EXISTS {table} (name text PRIMARY KEY, fence {kind} NOT NULL)",
        record=(
            f"INSERT INTO {table} AS f (name, fence) VALUES ({name}, {fence})"  # noqa: S608
            f" ON CONFLICT (name) DO UPDATE SET fence = excluded.fence{only_newer} RETURNING fence"
        ),
        current=f"SELECT fence FROM {table} WHERE name = {name}",  # noqa: S608
        lock=f"SELECT pg_advisory_xact_lock({_CREATE_LOCK})",
    )


# PostgreSQL tables known to exist, per database handle (a psycopg connection, a SQLAlchemy
# engine, a Django connection), so the table is created once and then costs nothing.
_created: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _known(key: object, table: str) -> bool:
    try:
        return table in _created.get(key, ())
    except TypeError:  # a handle without weak references: create every time
        return False


def _remember(key: object, table: str) -> None:
    with contextlib.suppress(TypeError):
        _created.setdefault(key, set()).add(table)


def _missing_table(exc: BaseException) -> bool:
    """Whether a SQLite statement failed because the table is not there (any driver's wrapper)."""
    return "no such table" in str(exc)


# -- the sequence: check and record at the start, commit or roll back at the end ------------


def _prepare(adapter: SyncAdapter | AsyncAdapter, table: str, schema: str | None) -> tuple[_Sql, str]:
    if adapter.dialect not in ("sqlite", "postgresql"):
        raise ConfigurationError(
            f"ostinato.fenced() works on SQLite and PostgreSQL, not on {adapter.dialect}"
        )
    qualified = f"{schema}.{table}" if schema else table
    return _sql(adapter.dialect, qualified, adapter.pyformat, _CHECK), qualified


def _open_sync(adapter: SyncAdapter, sql: _Sql, table: str, name: str, fence: int) -> bool:
    """Check and record ``fence``; True when the transaction is this helper's own to end."""
    owned = not adapter.in_transaction()
    postgres = adapter.dialect == "postgresql"
    if postgres and not _known(adapter.key, table):
        if owned:  # in a transaction of its own, so a rollback of the caller's keeps it
            adapter.begin()
            try:
                adapter.fetch(sql.lock)
                adapter.fetch(sql.create)
                adapter.commit()
            except BaseException:
                _quietly(adapter.rollback)
                raise
            _remember(adapter.key, table)
        else:
            adapter.fetch(sql.lock)
            adapter.fetch(sql.create)
    if owned:
        adapter.begin()
    try:
        params: Params = {"name": name, "fence": fence}
        try:
            row = adapter.fetch(sql.record, params)
        except Exception as exc:
            if postgres or not _missing_table(exc):
                raise
            # SQLite: a failed statement leaves the transaction as it was.
            adapter.fetch(sql.create)
            row = adapter.fetch(sql.record, params)
        if row is None:
            newer = adapter.fetch(sql.current, {"name": name})
            raise StaleFence(name, fence, int(newer[0]) if newer else -1)
    except BaseException:
        if owned:
            _quietly(adapter.rollback)
        raise
    return owned


async def _open_async(adapter: AsyncAdapter, sql: _Sql, table: str, name: str, fence: int) -> bool:
    """``_open_sync`` for async connections, statement for statement."""
    owned = not adapter.in_transaction()
    postgres = adapter.dialect == "postgresql"
    if postgres and not _known(adapter.key, table):
        if owned:
            await adapter.begin()
            try:
                await adapter.fetch(sql.lock)
                await adapter.fetch(sql.create)
                await adapter.commit()
            except BaseException:
                await _quietly_async(adapter.rollback)
                raise
            _remember(adapter.key, table)
        else:
            await adapter.fetch(sql.lock)
            await adapter.fetch(sql.create)
    if owned:
        await adapter.begin()
    try:
        params: Params = {"name": name, "fence": fence}
        try:
            row = await adapter.fetch(sql.record, params)
        except Exception as exc:
            if postgres or not _missing_table(exc):
                raise
            await adapter.fetch(sql.create)
            row = await adapter.fetch(sql.record, params)
        if row is None:
            newer = await adapter.fetch(sql.current, {"name": name})
            raise StaleFence(name, fence, int(newer[0]) if newer else -1)
    except BaseException:
        if owned:
            await _quietly_async(adapter.rollback)
        raise
    return owned


def _quietly(step: Any) -> None:
    # A rollback on the way out of an error: the first error is the one to report.
    with contextlib.suppress(Exception):
        step()


async def _quietly_async(step: Any) -> None:
    with contextlib.suppress(Exception):
        await step()


class Fenced:
    """A fenced transaction: ``with`` for sync connections, ``async with`` for async ones.

    Built by ``fenced()``. Entering it checks and records the fence (raising
    ``StaleFence`` with the transaction rolled back when a greater one is
    recorded); leaving it commits, or rolls back when the block raised. When the
    connection is already inside a transaction, the check joins that transaction
    and committing or rolling it back stays the caller's.
    """

    def __init__(self, adapter: SyncAdapter | AsyncAdapter, loop: str, fence: int, table: str,
                 schema: str | None) -> None:
        #: The lease name the fence is recorded against, and the fence.
        self.loop, self.fence = loop, fence
        self._adapter = adapter
        self._sql, self._table = _prepare(adapter, table, schema)
        self._owned = False

    def _sync(self) -> SyncAdapter:
        if isinstance(self._adapter, AsyncPsycopg | AsyncAlchemy):
            raise ConfigurationError("this is an async connection: use  async with ostinato.fenced(...)")
        return cast("SyncAdapter", self._adapter)

    def _async(self) -> AsyncAdapter:
        if not isinstance(self._adapter, AsyncPsycopg | AsyncAlchemy):
            raise ConfigurationError("this is a sync connection: use  with ostinato.fenced(...)")
        return self._adapter

    def __enter__(self) -> Fenced:
        self._owned = _open_sync(self._sync(), self._sql, self._table, self.loop, self.fence)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        adapter = self._sync()
        if not self._owned:
            return
        if kind is not None:
            _quietly(adapter.rollback)
            return
        try:
            adapter.commit()
        except BaseException:
            _quietly(adapter.rollback)
            raise

    async def __aenter__(self) -> Fenced:
        self._owned = await _open_async(self._async(), self._sql, self._table, self.loop, self.fence)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        adapter = self._async()
        if not self._owned:
            return
        if kind is not None:
            await _quietly_async(adapter.rollback)
            return
        try:
            await adapter.commit()
        except BaseException:
            await _quietly_async(adapter.rollback)
            raise


def fenced(
    conn: object,
    ctx: Pass | None = None,
    *,
    loop: str | None = None,
    fence: int | None = None,
    table: str = DEFAULT_TABLE,
    schema: str | None = None,
) -> Fenced:
    """A transaction on ``conn`` that commits only if no greater fence of the loop was recorded.

    ``with ostinato.fenced(conn, ctx): ...`` (``async with`` for async
    connections) records ``ctx.fence`` against ``ctx.lease_name`` in ``table``
    (created on first use, in ``schema`` when given) inside the same
    transaction as the block's writes. Outside a pass, give ``loop=`` (a lease
    name such as ``"app:loop"``) and ``fence=`` instead of ``ctx``. A stale
    fence raises ``StaleFence`` before the block runs, with nothing written.
    """
    name, number = fence_of(ctx, loop, fence)
    _identifier("table", table)
    if schema is not None:
        _identifier("schema", schema)
    return Fenced(adapter_for(conn), name, number, table, schema)
