"""Holders that hammer one table (or one Redis stream) from separate processes.

Each process takes a fence from a shared counter (a lease won), writes one row
per fenced transaction after random pauses, now and then takes a newer fence
(another lease won) and, when refused, takes a new one after a pause, as a
holder that lost its lease and won another would. Meanwhile its older fences
go stale while other processes write with newer ones.
"""

from __future__ import annotations

import random
import time
from typing import Any

import ostinato
from ostinato import fencing
from tests.fencing.stores import LOOP


def take(counter: Any) -> int:
    with counter.get_lock():
        counter.value += 1
        return int(counter.value)


def hammer(backend: str, target: str, data: str, fences: str, counter: Any, barrier: Any,
           seconds: float, seed: int, check: bool) -> int:
    """Write for ``seconds``; returns how many transactions were refused as stale."""
    fencing._CHECK = check
    rng = random.Random(seed)
    writer = f"w{seed}"
    if backend == "sqlite":
        import sqlite3

        conn: Any = sqlite3.connect(target, timeout=30)
    elif backend == "postgres":
        import psycopg

        conn = psycopg.connect(target)
    else:
        import redis

        conn = redis.Redis.from_url(target)
    refused = 0
    barrier.wait()
    fence, until = take(counter), time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(rng.uniform(0, 0.004) if rng.random() < 0.9 else rng.uniform(0.02, 0.05))
        if rng.random() < 0.1:
            fence = take(counter)
        try:
            if backend == "redis":
                with ostinato.redis_fenced(conn, loop=LOOP, fence=fence, prefix=fences) as batch:
                    batch.xadd(data, {"fence": fence, "writer": writer})
            else:
                with ostinato.fenced(conn, loop=LOOP, fence=fence, table=fences):
                    conn.execute(f"INSERT INTO {data} (fence, writer) VALUES ({fence}, '{writer}')")  # noqa: S608
        except ostinato.StaleFence:
            refused += 1
            time.sleep(rng.uniform(0, 0.01))
            fence = take(counter)
    conn.close()
    return refused


def report(results: Any, *args: Any) -> None:
    """``hammer(*args)``, its count put on ``results``."""
    results.put(hammer(*args))
