"""The fenced store: a SQLite file, apart from the coordinator, that refuses stale fences.

``fences`` holds the highest fence accepted per loop; a write is accepted only
when its fence is at least that (``UPDATE ... WHERE fence <= ?``). Every attempt,
accepted or not, is appended to ``writes`` in the same transaction, so the log's
order is the order the store decided in, and the checker can recompute from the
log alone whether a stale write was ever let through.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS fences (loop TEXT PRIMARY KEY, fence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS writes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    loop TEXT NOT NULL, fence INTEGER NOT NULL, pid INTEGER NOT NULL, seq INTEGER NOT NULL,
    accepted INTEGER NOT NULL, t_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Write:
    """One fenced write as the store logged it (``t`` on CLOCK_MONOTONIC, seconds)."""

    id: int
    loop: str
    fence: int
    pid: int
    seq: int
    accepted: bool
    t: float


def create(path: Path) -> None:
    """Create the store's file and tables (once, before the runners start)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
    finally:
        conn.close()


class FencedStore:
    """Fenced writes from the threads of one runner process (one connection per thread).

    ``fenced=False`` plants a bug for the checker's own test: the fence is
    written without being compared, so stale writes get through.
    """

    def __init__(self, path: Path, *, fenced: bool = True) -> None:
        self.path = path
        self.fenced = fenced
        self._local = threading.local()
        #: Held for each write transaction, so a thread that stops its own process
        #: (SIGSTOP) can first make sure no other thread of it holds the store's lock.
        self.lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def write(self, loop: str, fence: int, pid: int, seq: int, t_ns: int, *, locked: bool = False) -> bool:
        """Try to write as the holder of ``fence``; return whether the store accepted it."""
        if locked:
            return self._write(loop, fence, pid, seq, t_ns)
        with self.lock:
            return self._write(loop, fence, pid, seq, t_ns)

    def _write(self, loop: str, fence: int, pid: int, seq: int, t_ns: int) -> bool:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR IGNORE INTO fences (loop, fence) VALUES (?, 0)", (loop,))
            if self.fenced:
                cursor = conn.execute(
                    "UPDATE fences SET fence = ? WHERE loop = ? AND fence <= ?", (fence, loop, fence)
                )
            else:
                cursor = conn.execute("UPDATE fences SET fence = ? WHERE loop = ?", (fence, loop))
            accepted = cursor.rowcount == 1
            conn.execute(
                "INSERT INTO writes (loop, fence, pid, seq, accepted, t_ns) VALUES (?, ?, ?, ?, ?, ?)",
                (loop, fence, pid, seq, int(accepted), t_ns),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return accepted


def read_writes(path: Path) -> list[Write]:
    """Every write attempt, in the order the store decided them."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        rows = conn.execute(
            "SELECT id, loop, fence, pid, seq, accepted, t_ns FROM writes ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [Write(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6] / 1e9) for r in rows]
