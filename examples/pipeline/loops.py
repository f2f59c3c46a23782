"""The pipeline's continuous code: drain the inbox into windows, roll them up, prune.

Run as many runners as you like, on as many hosts as reach the store and the
coordinator::

    ostinato run examples.pipeline.loops:app

- ``aggregate`` is split into ``PARTITIONS`` loops by application
  (``aggregate#0`` ..): each drains the bundles of its own applications into
  10-second windows. The windows, the totals and the marks on the drained
  bundles are written in one transaction that ``ostinato.fenced`` guards, so a
  kill -9 at any instant leaves either all of it or none of it, and a holder
  that lost its lease (paused, cut off) has its whole transaction refused.
  It returns ``IDLE`` when its partition is empty; the ingest tier wakes it.
- ``rollup`` makes 1-minute windows of the 10-second ones that changed.
- ``prune`` deletes drained bundles and old windows.

The coordinator is ``$OSTINATO_COORDINATOR``, else SQLite in ``$PIPELINE_DATA``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from examples.pipeline.model import SLOTS, slots_of
from examples.pipeline.store import LOOPS_FLUSH, Overtaken, Store, data_dir, open_store
from examples.pipeline.store_redis import RedisStore

import ostinato
from ostinato.durations import parse_duration

#: Aggregator partitions; a divisor of ``SLOTS`` (64) spreads the applications evenly.
PARTITIONS = int(os.environ.get("PIPELINE_PARTITIONS", "4"))
#: The most bundles one pass drains.
BATCH = int(os.environ.get("PIPELINE_BATCH", "5000"))
#: The pause after a pass that found work: longer batches fewer, bigger transactions.
PAUSE = os.environ.get("PIPELINE_PAUSE", "100ms")
#: How long drained bundles, 10-second windows and 1-minute windows are kept.
RETAIN_RAW = parse_duration(os.environ.get("PIPELINE_RETAIN_RAW", "10m"), what="PIPELINE_RETAIN_RAW")
RETAIN_10S = parse_duration(os.environ.get("PIPELINE_RETAIN_10S", "6h"), what="PIPELINE_RETAIN_10S")
RETAIN_1M = parse_duration(os.environ.get("PIPELINE_RETAIN_1M", "7d"), what="PIPELINE_RETAIN_1M")
if not 1 <= PARTITIONS <= SLOTS:
    raise ValueError(f"PIPELINE_PARTITIONS must be from 1 to {SLOTS}, not {PARTITIONS}")


def coordinator_url() -> str:
    return os.environ.get("OSTINATO_COORDINATOR") or f"sqlite:///{data_dir().resolve() / 'ostinato.db'}"


app = ostinato.App("pipeline", coordinator=coordinator_url())

_store: Store | RedisStore | None = None
_conns: dict[str, Any] = {}
_lock = threading.Lock()


def store() -> Store | RedisStore:
    global _store  # one store per process, made on first use
    with _lock:
        if _store is None:
            _store = open_store()
        return _store


@contextmanager
def connection(owner: str) -> Iterator[Any]:
    """The connection kept for one loop member; dropped when a pass fails on it, so the next
    pass starts on a fresh one."""
    conn = _conns.pop(owner, None) or store().connect(flush=LOOPS_FLUSH)
    try:
        yield conn
    except BaseException:
        conn.close()
        raise
    _conns[owner] = conn


@app.loop(partitions=PARTITIONS, pause=PAUSE, idle=("100ms", "2s"), lease="5s", stall_after="1m")
def aggregate(ctx: ostinato.Pass) -> object:
    """Fold this partition's pending bundles into windows and totals, and mark them drained,
    all written in one fenced transaction."""
    part, parts = ctx.partition or 0, ctx.partitions or 1
    slots = slots_of(part, parts)
    db = store()
    with connection(ctx.lease_name) as conn:
        if not db.has_pending(conn, slots):  # a read: no write lock taken for an empty pass
            return ostinato.IDLE
        if isinstance(db, RedisStore):
            # One script checks the fence and drains, atomically (see store_redis.py).
            folded = db.drain(conn, ctx, slots, part, BATCH)
            return ostinato.IDLE if folded is None else None
        # Read and folded before the transaction, so the write lock is held for the writes only.
        pending = db.pending(conn, slots, BATCH)
        if pending is None:
            return ostinato.IDLE
        try:
            with db.fenced(conn, ctx):
                db.drain(conn, pending, ctx.fence, part)
        except Overtaken:
            pass  # rolled back; the next pass reads again
    return None


@app.loop(every="5s", lease="10s", stall_after="2m")
def rollup(ctx: ostinato.Pass) -> None:
    """Recompute the 1-minute windows whose 10-second windows changed."""
    db = store()
    with connection(ctx.lease_name) as conn:
        if isinstance(db, RedisStore):
            db.rollup(conn, ctx)
            return
        minutes = db.minutes(conn)  # merged before the transaction, as in aggregate
        if not minutes:
            return
        with db.fenced(conn, ctx):
            db.rollup(conn, minutes)


@app.loop(every="30s", lease="30s", stall_after="5m")
def prune(ctx: ostinato.Pass) -> None:
    """Delete drained bundles and windows past their retention (pending bundles never)."""
    db = store()
    with connection(ctx.lease_name) as conn:
        if isinstance(db, RedisStore):
            db.prune(conn, ctx, time.time(), RETAIN_10S, RETAIN_1M)
            return
        with db.fenced(conn, ctx):
            db.prune(conn, time.time(), RETAIN_RAW, RETAIN_10S, RETAIN_1M)
