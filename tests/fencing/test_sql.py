"""ostinato.fenced on SQLite and PostgreSQL, through sqlite3, psycopg and SQLAlchemy (sync and async).

Each safety test runs twice: as shipped ("checked"), where the checker finds
nothing, and with the fence comparison switched off ("unchecked"), where the
same scenario commits a stale row and the checker must find it.
"""

from __future__ import annotations

import asyncio

import pytest

from ostinato import StaleFence, fencing
from tests.fencing.conftest import MakeStore
from tests.fencing.stores import LOOP, kind_params, violations

CHECK = pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
KINDS = pytest.mark.parametrize(("kind", "backend"), kind_params())


@CHECK
@KINDS
async def test_newer_fence_then_older_one(store: MakeStore, monkeypatch: pytest.MonkeyPatch, kind: str,
                                          backend: str, check: bool) -> None:
    """After fence 2 committed, fence 1's transaction is refused with nothing written and the
    connection usable; unchecked, fence 1's row lands after fence 2's and the checker says so."""
    monkeypatch.setattr(fencing, "_CHECK", check)
    db = store(kind, backend)
    conn = await db.connect()
    try:
        await db.write(conn, 2, "newer")
        if check:
            with pytest.raises(StaleFence) as refused:
                await db.write(conn, 1, "stale")
            assert (refused.value.loop, refused.value.fence, refused.value.newer) == (LOOP, 1, 2)
            assert [w for _, _, w in db.rows()] == ["newer"]
            assert db.recorded() == 2
            assert violations(db.rows()) == []
            await db.write(conn, 3, "next")  # the connection is as it was: the next pass works
            assert [w for _, _, w in db.rows()] == ["newer", "next"]
        else:
            await db.write(conn, 1, "stale")
            assert violations(db.rows()) == [(2, 2)]
    finally:
        await db.close(conn)


@KINDS
async def test_a_stale_transaction_begun_first_makes_the_newer_one_wait(
        store: MakeStore, kind: str, backend: str) -> None:
    """A stale holder inside its fenced block holds the fence row's lock (SQLite: the write lock):
    the newer holder's transaction waits until the stale one commits, so the commit order is
    stale then newer, which keeps fences non-decreasing."""
    db = store(kind, backend)
    stale_conn, newer_conn = await db.connect(), await db.connect()
    try:
        block = db.fenced(stale_conn, 1)
        await db.enter(block)
        await db.insert(stale_conn, 1, "stale")
        newer = asyncio.create_task(db.write(newer_conn, 2, "newer"))
        await asyncio.sleep(0.3)
        assert not newer.done(), "the newer holder did not wait for the stale one's lock"
        await db.leave(block)
        await asyncio.wait_for(newer, 10)
        assert [(f, w) for _, f, w in sorted(db.rows())] == [(1, "stale"), (2, "newer")]
        assert violations(db.rows()) == []
        with pytest.raises(StaleFence):
            await db.write(stale_conn, 1, "stale again")
    finally:
        await db.close(stale_conn)
        await db.close(newer_conn)


@CHECK
@KINDS
async def test_a_stale_transaction_open_while_the_newer_one_commits(
        store: MakeStore, monkeypatch: pytest.MonkeyPatch, kind: str, backend: str, check: bool) -> None:
    """The stale holder's transaction is open (its own, begun before the helper) when the newer
    holder commits; its fenced block then joins it and is refused, and nothing of it commits.
    Unchecked, the stale row commits after the newer one and the checker says so."""
    monkeypatch.setattr(fencing, "_CHECK", check)
    db = store(kind, backend)
    stale_conn, newer_conn = await db.connect(), await db.connect()
    try:
        await db.begin(stale_conn)
        await asyncio.wait_for(db.write(newer_conn, 2, "newer"), 10)  # it does not wait
        block = db.fenced(stale_conn, 1)
        if check:
            with pytest.raises(StaleFence):
                await db.enter(block)
            await db.rollback(stale_conn)  # the caller's transaction: the caller rolls it back
            assert [w for _, _, w in db.rows()] == ["newer"]
            assert violations(db.rows()) == []
        else:
            await db.enter(block)
            await db.insert(stale_conn, 1, "stale")
            await db.leave(block)
            await db.commit(stale_conn)
            assert violations(db.rows()) == [(2, 2)]
    finally:
        await db.close(stale_conn)
        await db.close(newer_conn)


@KINDS
async def test_a_failing_block_rolls_back_and_records_nothing(store: MakeStore, kind: str,
                                                             backend: str) -> None:
    """An exception inside the block rolls back the writes and the fence alike."""
    db = store(kind, backend)
    conn = await db.connect()
    try:
        await db.write(conn, 1, "first")
        block = db.fenced(conn, 5)
        await db.enter(block)
        await db.insert(conn, 5, "lost")
        await db.leave(block, RuntimeError("the body failed"))
        assert [w for _, _, w in db.rows()] == ["first"]
        assert db.recorded() == 1
    finally:
        await db.close(conn)
