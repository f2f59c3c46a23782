"""One aggregator pass that kills itself with SIGKILL just before its ``k``-th SQL statement.

    python -m tests.pipeline.killed_pass DB K

Exits 0 when the pass ended before statement ``k``; otherwise dies by SIGKILL, as a
runner would under kill -9, with its transaction open.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys

from examples.pipeline import loops
from examples.pipeline.store import Store

import ostinato


def main() -> int:
    path, k = sys.argv[1], int(sys.argv[2])
    store = Store(f"sqlite:///{path}")
    connect = store.connect
    seen = [0]

    def trace(statement: str) -> None:
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    def traced(**flags: bool) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(**flags)
        conn.set_trace_callback(trace)
        return conn

    store.connect = traced  # type: ignore[method-assign]
    loops._store = store
    loops.aggregate(ostinato.Pass("aggregate", app="pipeline", fence=int(sys.argv[3]) if len(sys.argv) > 3
                                  else 1, partition=0, partitions=1))
    print(f"statements: {seen[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
