"""ostinato.fenced's arguments, what it leaves of the caller's connection, Django; no server needed."""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import ostinato
from ostinato import ConfigurationError, StaleFence
from tests.fencing import django_writes


def connect(path: Path, **options: object) -> sqlite3.Connection:
    conn = sqlite3.connect(path, **options)  # type: ignore[arg-type]
    conn.execute("CREATE TABLE IF NOT EXISTS data (fence INTEGER)")
    conn.commit()
    return conn


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: ostinato.fenced(c), "needs the pass"),
        (lambda c: ostinato.fenced(c, ostinato.Pass("l"), fence=3), "not both"),
        (lambda c: ostinato.fenced(c, loop="app:loop"), "both loop= and fence="),
        (lambda c: ostinato.fenced(c, loop="", fence=1), "lease name"),
        (lambda c: ostinato.fenced(c, loop="a", fence=True), "whole number"),
        (lambda c: ostinato.fenced(c, loop="a", fence=-1), "whole number"),
        (lambda c: ostinato.fenced(c, loop="a", fence=1, table="fences; DROP"), "table="),
        (lambda c: ostinato.fenced(c, loop="a", fence=1, schema="1x"), "schema="),
        (lambda c: ostinato.fenced(object(), loop="a", fence=1), "cannot fence a builtins.object"),
        (lambda c: ostinato.redis_fenced(c, loop="a", fence=1), "needs a redis-py client"),
    ],
)
def test_bad_arguments_get_one_clear_error(tmp_path: Path, call: object, words: str) -> None:
    """Each wrong argument is refused with a ConfigurationError that says what to give instead."""
    conn = connect(tmp_path / "db")
    with pytest.raises(ConfigurationError, match=words):
        call(conn)  # type: ignore[operator]


def test_engines_and_wrong_with_forms_are_named() -> None:
    """An Engine instead of a Connection, or `with` on an async connection, says what to do."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    with pytest.raises(ConfigurationError, match=r"engine.connect\(\)"):
        ostinato.fenced(create_engine("sqlite://"), loop="a", fence=1)
    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ConfigurationError, match="AsyncConnection"):
        ostinato.fenced(engine, loop="a", fence=1)


async def test_with_on_an_async_connection_says_async_with(tmp_path: Path) -> None:
    """`with` on an async connection (and `async with` on a sync one) is refused before any I/O."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'db'}")
    async with engine.connect() as conn:
        with pytest.raises(ConfigurationError, match="async with"), ostinato.fenced(conn, loop="a", fence=1):
            pass
    await engine.dispose()
    with pytest.raises(ConfigurationError, match="use  with"):
        async with ostinato.fenced(connect(tmp_path / "db2"), loop="a", fence=1):
            pass


@pytest.mark.parametrize("isolation_level", ["", "DEFERRED", None])
def test_the_callers_connection_is_left_as_it_was(tmp_path: Path, isolation_level: str | None) -> None:
    """Whatever its isolation_level, the sqlite3 connection keeps it and is out of any transaction
    after a committed, a failed and a refused block."""
    conn = connect(tmp_path / "db", isolation_level=isolation_level)
    with ostinato.fenced(conn, ostinato.Pass("loop", fence=2, app="app")):
        conn.execute("INSERT INTO data VALUES (2)")
    def fail() -> None:
        with ostinato.fenced(conn, loop="app:loop", fence=3):
            conn.execute("INSERT INTO data VALUES (3)")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    with pytest.raises(StaleFence), ostinato.fenced(conn, loop="app:loop", fence=1):
        conn.execute("INSERT INTO data VALUES (1)")
    assert conn.isolation_level == isolation_level
    assert not conn.in_transaction
    assert conn.execute("SELECT fence FROM data").fetchall() == [(2,)]
    assert conn.execute("SELECT name, fence FROM ostinato_fences").fetchall() == [("app:loop", 2)]


def test_an_open_transaction_is_joined_and_left_to_the_caller(tmp_path: Path) -> None:
    """Inside the caller's transaction the block checks and records the fence there, and neither
    commits nor rolls back: the caller does."""
    conn = connect(tmp_path / "db", isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO data VALUES (0)")
    with ostinato.fenced(conn, loop="app:loop", fence=4):
        conn.execute("INSERT INTO data VALUES (4)")
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM data").fetchone() == (0,)


def test_committing_inside_the_block_is_an_error(tmp_path: Path) -> None:
    """A block that commits its own transaction is told to leave that to the helper."""
    conn = connect(tmp_path / "db")
    with pytest.raises(ConfigurationError, match="leave that to the with block"), \
            ostinato.fenced(conn, loop="app:loop", fence=1):
        conn.commit()


def test_stale_fence_names_the_loop_and_both_fences_and_pickles() -> None:
    """The message names the loop, this fence and the newer one; the error survives pickling
    (a pass in a child process sends it back)."""
    error = StaleFence("app:loop#3", 4, 7)
    for words in ("'app:loop#3'", "fence 4", "fence 7"):
        assert words in str(error)
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
    assert (again.loop, again.fence, again.newer, str(again)) == ("app:loop#3", 4, 7, str(error))


def test_django_connection(tmp_path: Path) -> None:
    """A Django connection: fence 2 commits, fences 1 and 0 are refused inside transaction.atomic()
    with nothing written."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pool.submit(django_writes.run, str(tmp_path / "django.db")).result(timeout=60)
    assert result == {"rows": [2], "refused": [2, 2], "in_atomic": False}
