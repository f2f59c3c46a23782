"""The metrics pipeline: POSTs land in an inbox fast, and one copy of ``aggregate`` drains it.

``receive`` stands in for the web tier (thousands of small writes a second);
``aggregate`` folds the inbox into per-app totals every second in one fenced
transaction (``ostinato.fenced``), so a stale holder can neither delete inbox
rows nor touch the totals once a newer holder has written; ``publish`` talks to a
flaky upstream and fails now and then, which backs off and retries, never
stopping the loop.

    ostinato run examples/metrics.py:app
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from contextlib import closing

import ostinato

DB = os.environ.get("METRICS_DB", "metrics.db")
APPS = ["shop", "blog", "api"]

app = ostinato.App("metrics")


def connect() -> sqlite3.Connection:
    conn = sqlite3.connect(DB, timeout=5.0, isolation_level=None)
    conn.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, app TEXT, queue_ms REAL);
        CREATE TABLE IF NOT EXISTS totals (app TEXT PRIMARY KEY, points INTEGER, sum_ms REAL);
        """
    )
    return conn


@app.loop(pause="20ms")
def receive(ctx: ostinato.Pass) -> None:
    """Take a burst of POSTed measurements (here: made up) into the inbox."""
    with connect() as conn:
        conn.executemany(
            "INSERT INTO inbox (app, queue_ms) VALUES (?, ?)",
            [(random.choice(APPS), random.expovariate(1 / 40)) for _ in range(random.randint(5, 60))],
        )


@app.loop(every="1s", idle=("250ms", "2s"), stall_after="30s")
def aggregate(ctx: ostinato.Pass) -> object:
    """Drain the inbox into per-app totals; a stale holder's whole transaction is refused."""
    with closing(connect()) as conn, ostinato.fenced(conn, ctx):
        # The fence is checked before the first statement: the DELETE is fenced too.
        rows = conn.execute("SELECT id, app, queue_ms FROM inbox ORDER BY id LIMIT 50000").fetchall()
        if not rows:
            return ostinato.IDLE
        conn.execute("DELETE FROM inbox WHERE id <= ?", (rows[-1][0],))
        for name in APPS:
            mine = [ms for _, a, ms in rows if a == name]
            conn.execute(
                "INSERT INTO totals (app, points, sum_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (app) DO UPDATE SET points = points + excluded.points,"
                " sum_ms = sum_ms + excluded.sum_ms",
                (name, len(mine), sum(mine)),
            )
    print(f"[pid {os.getpid()} fence {ctx.fence}] aggregate pass {ctx.number}: "
          f"{len(rows)} points", flush=True)
    return None


@app.loop(every="2s", error_backoff=("500ms", "5s"))
def publish(ctx: ostinato.Pass) -> None:
    """Send the totals upstream; the upstream times out one call in four."""
    if random.random() < 0.25:
        raise TimeoutError("upstream did not answer in 2s")
    with connect() as conn:
        totals = conn.execute("SELECT app, points, sum_ms FROM totals ORDER BY app").fetchall()
    summary = ", ".join(f"{a}: {n} pts, avg {s / max(n, 1):.1f} ms" for a, n, s in totals)
    print(f"[pid {os.getpid()}] published {summary}", flush=True)
    time.sleep(0.01)
