"""One of the four processes of the SQLite ``contention`` fault.

    python -m tests.chaos.contend DB SECONDS

Writes to its own table in the coordinator's database file for SECONDS, a
transaction at a time, and prints how many it made.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time

#: How long a contending process waits between its write transactions: hard
#: contention, yet the lock is free now and then. 0 (CHAOS_CONTENTION_GAP_MS=0)
#: writes back to back.
GAP = float(os.environ.get("CHAOS_CONTENTION_GAP_MS", "1")) / 1000


def contend(db: str, seconds: float) -> int:
    """Write transactions on ``db`` for ``seconds``, ``GAP`` apart; return how many."""
    conn = sqlite3.connect(db, timeout=30.0, isolation_level=None)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS chaos_contention (n INTEGER PRIMARY KEY, v BLOB)")
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO chaos_contention VALUES (?, randomblob(512))",
                         (n % 100,))
            conn.execute("COMMIT")
            n += 1
            time.sleep(GAP)
    finally:
        conn.close()
    return n


if __name__ == "__main__":
    print(contend(sys.argv[1], float(sys.argv[2])))
