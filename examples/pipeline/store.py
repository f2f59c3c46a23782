"""Where bundles and windows live: SQLite (WAL) under ``$PIPELINE_DATA``, or PostgreSQL.

``$PIPELINE_STORE`` picks the store: unset, ``sqlite:///path.db`` or
``postgresql://...`` (tables in the schema ``$PIPELINE_SCHEMA``, default
``pipeline``); ``redis://...`` is ``examples.pipeline.store_redis``. One
``Store`` serves both tiers: the ingest tier adds bundles in batches (``add``),
the loops drain, roll up and prune inside transactions that ``ostinato.fenced``
guards (``fenced``), and the read endpoints ask for totals, windows and stats.
A connection belongs to one thread.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from examples.pipeline import sql
from examples.pipeline.model import ROLLUP, WINDOW, Bundle, Fold, Window, fold, merged, window_start

import ostinato
from ostinato.coordinators import redact
from ostinato.fencing import Fenced

if TYPE_CHECKING:
    from examples.pipeline.store_redis import RedisStore

DEFAULT_SCHEMA = "pipeline"
#: How long a SQLite connection waits for the write lock before giving up (seconds).
LOCK_WAIT = 30.0
#: How often ``add`` tries the write lock again on a ``poll_lock`` connection (seconds).
LOCK_POLL = 0.0005
#: Whether the loops' SQLite commits are flushed to disk each (``synchronous=FULL``). They are
#: not: a pass holds the write lock until its commit returns, and the ingest tier's commits wait
#: for it, so a flush there (a few ms, tens when the disk is busy) is paid by the requests too.
#: Nothing is lost: the next ingest commit's flush carries the pass's commit with it (one WAL
#: file), and a power cut before that loses whole transactions from the end of the log only,
#: so the lost pass's bundles are pending again, its windows and totals gone with its marks,
#: and the next pass drains them once.
LOOPS_FLUSH = False


def data_dir() -> Path:
    """``$PIPELINE_DATA`` (default ``./pipeline-data``): the store's and the coordinator's folder.
    ``serve`` makes it; nothing else does, so a mistyped path is an error, not a new folder."""
    return Path(os.environ.get("PIPELINE_DATA", "pipeline-data"))


def store_url() -> str:
    return os.environ.get("PIPELINE_STORE") or f"sqlite:///{data_dir() / 'pipeline.db'}"


def display(url: str) -> str:
    """``url`` fit to print: a password is never shown."""
    return redact(url)


def open_store(url: str | None = None) -> Store | RedisStore:
    """The store ``url`` (default ``$PIPELINE_STORE``, else SQLite in ``$PIPELINE_DATA``) names."""
    url = url or store_url()
    if url.split("://", 1)[0] in ("redis", "rediss"):
        from examples.pipeline.store_redis import RedisStore

        return RedisStore(url)
    return Store(url)


class Overtaken(Exception):
    """Bundles a pass read were drained by another holder before the pass took the write lock."""


@dataclass(frozen=True)
class Pending:
    """Pending bundles as a pass read them: their ids, when each was received, their fold."""

    ids: list[int]
    received: list[float]
    folded: Fold


@dataclass(frozen=True)
class Minute:
    """A 1-minute window merged from its 10-second ones, and the version each was read at."""

    app: str
    start: int
    window: Window
    versions: list[tuple[int, int]]


class Store:
    """The pipeline's tables in one database, and every statement run on them."""

    def __init__(self, url: str | None = None, schema: str | None = None) -> None:
        self.url = url or store_url()
        scheme = self.url.split("://", 1)[0]
        if scheme == "sqlite":
            self.dialect = "sqlite"
            self.q = sql.SQLITE
            self.path = self.url.removeprefix("sqlite:///")
        elif scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
            self.q = sql.POSTGRES
        else:
            raise ValueError("$PIPELINE_STORE must be sqlite:///path.db, postgresql://... or "
                             f"redis://..., not {display(self.url)!r}")
        self.schema = schema or os.environ.get("PIPELINE_SCHEMA", DEFAULT_SCHEMA)
        self._ready = False

    def connect(self, *, poll_lock: bool = False, flush: bool = True, checkpoint: bool = True) -> Any:
        """A new connection, in autocommit mode (transactions are begun explicitly), tables made.

        SQLite only: ``poll_lock``: the connection does not wait for the write lock itself, and
        ``add`` tries again every ``LOCK_POLL`` seconds instead. SQLite's own wait sleeps 1, 2,
        5, 10, 15, 20, 25 ms... between tries, so a writer may get the lock up to twice as late
        as it was freed: a pass holding it 10 ms could delay the ingest tier's commit 18 ms.
        ``flush`` False: a commit is not flushed to disk by itself (``synchronous=NORMAL``),
        which the loops use; see ``LOOPS_FLUSH``. ``checkpoint`` False: a commit never copies
        the WAL into the database itself (SQLite's automatic checkpoint, which a commit that
        takes the WAL past 1,000 pages runs before it returns, with an fsync of the database
        file): the ingest tier's writer uses such a connection and leaves checkpoints to
        ``checkpoint()`` in a thread of their own, so no request waits for one."""
        conn: Any
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self.path, timeout=0.0 if poll_lock else LOCK_WAIT,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a bundle answered 202 survives a power cut, not only a crash; the
            # ingest tier's group commit pays the fsync once per batch.
            conn.execute(f"PRAGMA synchronous={'FULL' if flush else 'NORMAL'}")
            if not checkpoint:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            if not self._ready:
                conn.executescript(sql.SQLITE_SCHEMA)
        else:
            import psycopg

            conn = psycopg.connect(self.url, autocommit=True)
            if not self._ready:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            conn.execute(f'SET search_path TO "{self.schema}"')
            if not self._ready:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(7068)")  # one creator at a time
                    conn.execute(sql.POSTGRES_SCHEMA)
        self._ready = True
        return conn

    def fenced(self, conn: Any, ctx: ostinato.Pass) -> Fenced:
        """The pass's transaction: commits only if no newer fence of its lease was recorded."""
        return ostinato.fenced(conn, ctx, schema=self.schema if self.dialect == "postgresql" else None)

    def _list(self, values: Sequence[int]) -> object:
        return json.dumps(list(values)) if self.dialect == "sqlite" else list(values)

    # -- the ingest tier -------------------------------------------------------------------

    def add(self, conn: Any, bundles: Sequence[tuple[Bundle, float]]) -> None:
        """Store ``(bundle, received)`` pairs in one statement: all of them, or none."""
        if self.dialect == "sqlite":
            rows = json.dumps([(b.slot, b.app, b.source, received, len(b.samples), b.samples_json())
                               for b, received in bundles])
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    conn.execute(self.q["insert"], (rows,))
                    return
                except sqlite3.OperationalError as exc:
                    # Busy: another connection holds the write lock, and nothing was written.
                    if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                        raise
                time.sleep(LOCK_POLL)
        else:
            columns = ([b.slot for b, _ in bundles], [b.app for b, _ in bundles],
                       [b.source for b, _ in bundles], [received for _, received in bundles],
                       [len(b.samples) for b, _ in bundles], [b.samples_json() for b, _ in bundles])
            conn.execute(self.q["insert"], columns)

    def checkpoint(self, conn: Any) -> None:
        """SQLite: copy what the WAL holds into the database, as far as readers allow, without
        waiting for a writer or reader (``PASSIVE``: commits go on meanwhile). Elsewhere nothing."""
        if self.dialect == "sqlite":
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- the loops, each inside a fenced transaction ---------------------------------------

    def has_pending(self, conn: Any, slots: Sequence[int]) -> bool:
        """Whether any bundle of ``slots`` waits (a plain read, outside any transaction)."""
        return conn.execute(self.q["has_pending"], (self._list(slots),)).fetchone() is not None

    def pending(self, conn: Any, slots: Sequence[int], limit: int) -> Pending | None:
        """Up to ``limit`` pending bundles of ``slots``, folded into windows; None when there are
        none. A plain read, outside any transaction: the folding is done before the pass takes
        the write lock, which on SQLite the ingest tier's commits wait for."""
        rows = conn.execute(self.q["pending"], (self._list(slots), limit)).fetchall()
        if not rows:
            return None
        return Pending([r[0] for r in rows], [r[2] for r in rows],
                       fold((app, json.loads(samples)) for _, app, _, samples in rows))

    def drain(self, conn: Any, pending: Pending, fence: int, part: int) -> Fold:
        """Mark the ``pending`` bundles drained by ``fence`` and add their fold to the windows,
        totals and lags. Call inside ``fenced``; ``Overtaken`` (roll back, read again) if any
        of them was drained since they were read."""
        now = time.time()
        marked = conn.execute(self.q["drained"], (now, fence, self._list(pending.ids))).rowcount
        if marked != len(pending.ids):
            # A holder that took the lease over drained them after this pass read them and before
            # it took the write lock; this pass's fence is still the newest, so it reads again.
            raise Overtaken(f"{len(pending.ids) - marked} of {len(pending.ids)} bundles were drained "
                            "since they were read")
        folded = pending.folded
        for (app, start), window in sorted(folded.windows.items()):
            self._merge_into(conn, WINDOW, app, start, window)
        for app in sorted(folded.bundles):
            conn.execute(self.q["add_totals"], (app, folded.bundles[app], folded.samples[app]))
        lag = Window()
        for received in pending.received:
            lag.add(max(0.0, (now - received) * 1000.0))
        start = window_start(now)
        old = conn.execute(self.q["lag"], (start, part)).fetchone()
        if old is not None:
            lag.merge(Window.decode(*old))
        conn.execute(self.q["put_lag"], (start, part, lag.count, lag.max, lag.encode()))
        return folded

    def _merge_into(self, conn: Any, width: int, app: str, start: int, window: Window) -> None:
        old = conn.execute(self.q["window"], (width, app, start)).fetchone()
        if old is not None:
            window.merge(Window.decode(*old))
        conn.execute(self.q["put_window"], (width, app, start, window.count, window.max, window.encode()))

    def minutes(self, conn: Any, limit: int = 500) -> list[Minute]:
        """The minutes whose 10-second windows changed since they were last rolled up, each
        merged from its windows as they are now. A plain read, outside any transaction, so the
        merging is done before the roll-up takes the write lock."""
        out = []
        for app, minute in conn.execute(self.q["unrolled"], (limit,)).fetchall():
            rows = conn.execute(self.q["minute"], (app, minute, minute + ROLLUP)).fetchall()
            total = merged(Window.decode(count, max_ms, buckets) for _, count, max_ms, buckets, _ in rows)
            out.append(Minute(app, minute, total, [(start, version) for start, _, _, _, version in rows]))
        return out

    def rollup(self, conn: Any, minutes: Sequence[Minute]) -> int:
        """Write ``minutes`` and mark the 10-second windows they were merged from rolled up, each
        at the version it was read at: one that changed since is rolled up again next time.
        Call inside ``fenced``; how many minutes."""
        for m in minutes:
            conn.execute(self.q["put_window"], (ROLLUP, m.app, m.start, m.window.count, m.window.max,
                                                m.window.encode()))
            for start, version in m.versions:
                conn.execute(self.q["rolled"], (version, m.app, start, version))
        return len(minutes)

    def prune(self, conn: Any, now: float, raw: float, tens: float, minutes: float) -> int:
        """Delete drained bundles older than ``raw`` seconds, rolled-up 10-second windows and
        lags older than ``tens``, minutes older than ``minutes``; rows deleted."""
        deleted = conn.execute(self.q["prune_bundles"], (now - raw,)).rowcount
        deleted += conn.execute(self.q["prune_windows"], (WINDOW, int(now - tens))).rowcount
        deleted += conn.execute(self.q["prune_minutes"], (int(now - minutes),)).rowcount
        deleted += conn.execute(self.q["prune_lags"], (int(now - tens),)).rowcount
        return int(deleted)

    # -- reads: committed aggregates only --------------------------------------------------

    def totals(self, conn: Any) -> dict[str, int]:
        bundles, samples = conn.execute(self.q["totals"]).fetchone()
        return {"bundles": int(bundles), "samples": int(samples)}

    def apps(self, conn: Any) -> dict[str, dict[str, int]]:
        return {app: {"bundles": int(b), "samples": int(s)}
                for app, b, s in conn.execute(self.q["apps"]).fetchall()}

    def windows(self, conn: Any, app: str, width: int, since: float) -> list[dict[str, Any]]:
        rows = conn.execute(self.q["windows"], (width, app, int(since))).fetchall()
        return [{"start": int(start), **Window.decode(count, max_ms, buckets).summary()}
                for start, count, max_ms, buckets in rows]

    def recent(self, conn: Any, since: float) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for app, start, count, max_ms, buckets in conn.execute(self.q["recent_windows"], (int(since),)):
            out.setdefault(app, []).append(
                {"start": int(start), **Window.decode(count, max_ms, buckets).summary()})
        return out

    def unrolled(self, conn: Any) -> int:
        """How many 10-second windows changed since their minute was last rolled up."""
        return int(conn.execute("SELECT COUNT(*) FROM windows WHERE width = 10 AND rolled < version")
                   .fetchone()[0])

    def depth(self, conn: Any) -> int:
        return int(conn.execute(self.q["depth"]).fetchone()[0])

    def lags(self, conn: Any, since: float) -> list[dict[str, Any]]:
        """Per 10 s of commit time: how long the bundles drained then had waited (ms)."""
        by_start: dict[int, Window] = {}
        for start, count, max_ms, buckets in conn.execute(self.q["lags"], (int(since),)).fetchall():
            by_start.setdefault(int(start), Window()).merge(Window.decode(count, max_ms, buckets))
        return [{"start": start, **window.summary()} for start, window in sorted(by_start.items())]

    def lag_total(self, conn: Any, since: float) -> Window:
        """Every drained bundle's wait since ``since``, as one histogram (for the benchmark)."""
        rows = conn.execute(self.q["lags"], (int(since),)).fetchall()
        return merged(Window.decode(count, max_ms, buckets) for _, count, max_ms, buckets in rows)


def with_conn(store: Store, job: Any) -> Any:
    """``job(conn)`` on a connection of its own, closed after."""
    with closing(store.connect()) as conn:
        return job(conn)


def drained_by(conn: Any, fence: int) -> int:
    """How many bundles a pass under ``fence`` marked drained (for the stale-holder test)."""
    return int(conn.execute(f"SELECT COUNT(*) FROM bundles WHERE drained_by = {int(fence)}").fetchone()[0])  # noqa: S608


def pending_ids(conn: Any) -> Iterable[int]:
    return [r[0] for r in conn.execute("SELECT id FROM bundles WHERE drained_at IS NULL ORDER BY id")]
