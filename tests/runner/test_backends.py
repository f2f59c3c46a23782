"""Runners on the server coordinators, in one process: what only a server can do to a holder."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

import ostinato
from ostinato.loop import Pass
from tests.history import PassRecord, fences_only_grow, overlaps
from tests.runner.test_runner import until
from tests.servers import postgres_url

pytestmark = pytest.mark.backend


async def test_a_holder_whose_connection_is_terminated_stops_before_the_standby_starts() -> None:
    """pg_terminate_backend of the holder's connection: its passes stop at once, a new fence follows."""
    import psycopg

    url = f"{postgres_url()}?schema=test_{uuid.uuid4().hex[:10]}"
    records: list[PassRecord] = []
    lock = threading.Lock()

    def app(tag: int) -> ostinato.App:
        made = ostinato.App("term", coordinator=url)

        @made.loop(lease="10s")
        def work(ctx: Pass) -> None:
            start = time.monotonic()
            time.sleep(0.002)
            with lock:
                records.append(PassRecord(tag, ctx.fence, start, time.monotonic()))

        return made

    first, second = app(1), app(2)
    async with first.running() as holder_runner:
        await until(lambda: len(records) > 10, 10)
        async with second.running():
            await asyncio.sleep(0.3)  # the standby is refused and waits on the holder's lock
            assert {r.pid for r in records} == {1}
            backend = holder_runner.coordinator._lease.conn.info.backend_pid  # type: ignore[attr-defined]
            async with await psycopg.AsyncConnection.connect(postgres_url(), autocommit=True) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", [backend])
            terminated = time.monotonic()
            old = records[-1].fence
            # Either runner may win the loop next (the old holder reconnects and asks too).
            await until(lambda: records[-1].fence > old, 10)
    after = next(r for r in records if r.fence > old)
    # Well inside the 10 s lease and its 3.3 s renewal interval: the lock freed, the holder noticed.
    assert after.start - terminated < 2.0
    assert max(r.end for r in records if r.fence == old) <= after.start  # type: ignore[type-var]
    assert overlaps(records) == []
    assert fences_only_grow(records)
    drop = getattr(first.connect(), "drop_everything", None)
    if drop is not None:
        await drop()
