"""``sqlite:///path.db``: the embedded default, for runner processes on one host.

Expiry is judged on the host's monotonic clock (``CLOCK_MONOTONIC`` is shared by
every process of one boot), tagged with the boot id, so a wall-clock jump never
expires or extends a lease. Every grant bumps the loop's fence in the same
write transaction; the database is synced on every commit, so a fence survives
a crash of the process or of the host.

A dead holder is noticed at once instead of after its TTL: each runner holds an
exclusive ``flock`` on a file of its own (``<db>-runners/<id>.lock``) for its
whole life, which the kernel frees when the process dies. A lease whose
holder's lock can be taken is up for grabs, and a standby that was refused
watches the holder's process (``pidfd``) to try again the moment it exits. A
holder that is merely stopped (SIGSTOP) keeps its lock, so it loses its lease
only when the TTL runs out.

Events reach the runners of this database as UDP datagrams on the loopback
interface, sent to the port each runner registered.

Each coordinator uses its connection from one thread, which takes waiting
calls by priority: renewals before anything else, a standby's lease requests
last, so a runner's renewals never queue behind its own standbys' polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ostinato.coordinators.liveness import RunnerLocks, boot_id
from ostinato.coordinators.protocol import (
    Coordinator,
    Denied,
    Event,
    Grant,
    LoopRecord,
    LoopStats,
    Renewal,
    RunnerInfo,
    RunnerRecord,
    Setting,
    hosts_from,
    hosts_text,
    stats_fields,
)
from ostinato.coordinators.sqlite_sql import SCHEMA, SQL, STAT_COLUMNS, add_columns
from ostinato.coordinators.sqlite_worker import RENEWAL, REQUEST, URGENT
from ostinato.coordinators.sqlite_worker import Worker as _Worker
from ostinato.coordinators.urls import sqlite_path
from ostinato.errors import ConfigurationError, CoordinatorUnavailable

log = logging.getLogger("ostinato.sqlite")
T = TypeVar("T")

#: Whether this SQLite extends many leases in one statement (UPDATE ... FROM, RETURNING).
BATCH_RENEWAL = sqlite3.sqlite_version_info >= (3, 35)


class SQLiteCoordinator(Coordinator):
    """Leases in a SQLite database shared by the processes of one host."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self.display_url = url
        self.locks = RunnerLocks(self.path.with_name(self.path.name + "-runners"))
        self._boot = boot_id()
        self._worker = _Worker()
        self._conn: sqlite3.Connection | None = None
        self._watched: dict[str, set[str]] = {}
        self._watch_tasks: set[asyncio.Task[None]] = set()
        self._callbacks: list[Callable[[Event], None]] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._closed = False

    # -- plumbing -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            # Switching to WAL takes an exclusive lock without waiting for a busy
            # file, so runners that start together take turns at it.
            deadline = time.monotonic() + 5.0
            while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                except sqlite3.OperationalError as exc:
                    if not _transient(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            add_columns(conn)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[..., T], *args: Any, priority: int = URGENT) -> T:
        if self._closed:
            raise CoordinatorUnavailable(f"the coordinator {self.display_url} is closed")

        def call() -> T:
            conn = self._connect()
            return fn(conn, *args)

        try:
            return await asyncio.wrap_future(self._worker.submit(priority, call))
        except sqlite3.OperationalError as exc:
            if self._conn is None and not _transient(exc):
                raise ConfigurationError(f"cannot open SQLite database {self.path}: {exc}") from exc
            raise CoordinatorUnavailable(f"SQLite database {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(
                f"{self.path} is not a usable SQLite database ({exc}); point the URL elsewhere"
            ) from exc

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._watch_tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.close()
        self._send.close()

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
            self.locks.release_all()

        await asyncio.wrap_future(self._worker.submit(REQUEST, shut))  # after every call before it
        self._worker.stop()

    @staticmethod
    def _write(conn: sqlite3.Connection) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def transaction() -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        return transaction()  # type: ignore[no-any-return,unused-ignore]

    # -- leases ----------------------------------------------------------------

    def _expired(self, row: sqlite3.Row, now: float) -> bool:
        return row["owner"] is None or row["boot"] != self._boot or row["expires"] <= now

    async def acquire(self, key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        return (await self.acquire_many(runner, {key: ttl}))[key]

    async def acquire_many(
        self, runner: RunnerInfo, requests: Mapping[str, float]
    ) -> dict[str, Grant | Denied]:
        """Every request in one transaction (one commit to disk for the whole batch)."""

        def grant(
            conn: sqlite3.Connection,
        ) -> tuple[dict[str, Grant | Denied], dict[str, tuple[str, int]]]:
            self.locks.hold(runner.id)
            answers: dict[str, Grant | Denied] = {}
            watch: dict[str, tuple[str, int]] = {}  # refused: key -> (owner, pid) of its holder
            with self._write(conn):
                # The grants' claims run from here: a lease counts from when the
                # transaction holding the database's write lock began, not from when
                # its request joined the queue.
                now = time.monotonic()
                wall = time.time()
                for key, ttl in requests.items():
                    conn.execute(SQL["ensure_loop"], (key,))
                    row = conn.execute(SQL["loop"], (key,)).fetchone()
                    if row["paused"]:
                        answers[key] = Denied(holder=None, expires_in=None, paused=True)
                        continue
                    if (
                        row["owner"] != runner.id
                        and not self._expired(row, now)
                        and not self.locks.dead(row["owner"])
                    ):
                        answers[key] = Denied(holder=row["holder"], expires_in=row["expires"] - now)
                        if row["holder_pid"] is not None and row["owner"] is not None:
                            watch[key] = (row["owner"], row["holder_pid"])
                        continue
                    fence = row["fence"] + 1
                    conn.execute(
                        SQL["grant"],
                        (fence, runner.id, runner.label, runner.pid, self._boot, now + ttl, wall, key),
                    )
                    answers[key] = Grant(fence=fence, last_start=row["last_start"], sent=now)
            return answers, watch

        answers, watch = await self._run(grant, priority=REQUEST)
        for key, (owner, holder_pid) in watch.items():
            self._watch_holder(owner, holder_pid, key)
        return answers

    async def renew(
        self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
    ) -> dict[str, Renewal]:
        def extend(conn: sqlite3.Connection) -> dict[str, Renewal]:
            answers: dict[str, Renewal] = {}
            with self._write(conn):
                now = time.monotonic()
                if BATCH_RENEWAL and len(leases) > 1:
                    batch = json.dumps([[key, fence, ttl] for key, (fence, ttl) in leases.items()])
                    extended = conn.execute(SQL["extend_many"], {
                        "now": now, "batch": batch, "owner": runner.id, "boot": self._boot,
                    }).fetchall()
                    answers = dict.fromkeys((row[0] for row in extended), Renewal.HELD)
                for key, (fence, ttl) in leases.items():
                    if key in answers:
                        continue
                    row = conn.execute(SQL["claim"], (key,)).fetchone()
                    if (
                        row is None or row["owner"] != runner.id or row["fence"] != fence
                        or self._expired(row, now)
                    ):
                        answers[key] = Renewal.LOST
                    elif row["paused"]:
                        conn.execute(SQL["unclaim"], (key,))
                        answers[key] = Renewal.PAUSED
                    else:
                        conn.execute(SQL["extend"], (now + ttl, key))
                        answers[key] = Renewal.HELD
            return answers

        return await self._run(extend, priority=RENEWAL)

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        return key in await self.release_many(runner, {key: fence})

    async def release_many(self, runner: RunnerInfo, leases: Mapping[str, int]) -> set[str]:
        def drop(conn: sqlite3.Connection) -> set[str]:
            with self._write(conn):
                return {key for key, fence in leases.items()
                        if conn.execute(SQL["release"], (key, runner.id, fence)).rowcount == 1}

        return await self._run(drop) if leases else set()

    async def revoke(self, key: str) -> int | None:
        def drop(conn: sqlite3.Connection) -> int | None:
            with self._write(conn):
                row = conn.execute(SQL["loop"], (key,)).fetchone()
                if row is None or self._expired(row, time.monotonic()):
                    return None
                conn.execute(SQL["unclaim"], (key,))
                fence: int = row["fence"]
                return fence

        return await self._run(drop)

    async def forget(self, key: str) -> bool:
        def drop(conn: sqlite3.Connection) -> bool:
            with self._write(conn):
                row = conn.execute(SQL["loop"], (key,)).fetchone()
                if row is None:
                    return True
                if not self._expired(row, time.monotonic()) and not self.locks.dead(row["owner"]):
                    return False
                conn.execute(SQL["forget"], (key,))
                return True

        return await self._run(drop)

    # -- reports and status ----------------------------------------------------

    async def report(self, runner: RunnerInfo, ttl: float, stats: Sequence[LoopStats]) -> None:
        def store(conn: sqlite3.Connection) -> None:
            self.locks.hold(runner.id)
            with self._write(conn):
                conn.execute(
                    SQL["heartbeat"],
                    (runner.id, runner.label, runner.pid, self._boot, time.monotonic() + ttl,
                     hosts_text(runner)),
                )
                for item in stats:
                    fields = stats_fields(item)
                    sets = ", ".join(f"{name} = ?" for name in fields)
                    conn.execute(SQL["ensure_loop"], (item.key,))
                    conn.execute(
                        SQL["report"].format(sets=sets),
                        (item.passes, item.errors, *fields.values(), item.key),
                    )

        await self._run(store)

    async def runners(self) -> list[RunnerRecord]:
        def read(conn: sqlite3.Connection) -> list[RunnerRecord]:
            rows = conn.execute(SQL["runners"], (self._boot, time.monotonic())).fetchall()
            # A runner whose liveness lock is free has died, heartbeat or not.
            return [
                RunnerRecord(r["id"], r["label"], r["expires"], hosts_from(r["hosts"]))
                for r in rows
                if not self.locks.dead(r["id"])
            ]

        return await self._run(read)

    async def set_paused(self, key: str, paused: bool) -> None:
        def store(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                conn.execute(SQL["ensure_loop"], (key,))
                conn.execute(SQL["pause"], (int(paused), key))

        await self._run(store)

    async def loops(self) -> list[LoopRecord]:
        def read(conn: sqlite3.Connection) -> list[LoopRecord]:
            now = time.monotonic()
            records = []
            for row in conn.execute(SQL["loops"]):
                held = not self._expired(row, now) and not self.locks.dead(row["owner"])
                if row["forgotten"] and not held:
                    continue
                records.append(
                    LoopRecord(
                        key=row["key"],
                        fence=row["fence"],
                        paused=bool(row["paused"]),
                        holder=row["holder"] if held else None,
                        held_since=row["held_since"] if held else None,
                        passes=row["passes"],
                        errors=row["errors"],
                        **{name: row[name] for name in STAT_COLUMNS},
                    )
                )
            return records

        return await self._run(read)

    # -- settings ----------------------------------------------------------------

    async def read_setting(self, name: str) -> Setting | None:
        def read(conn: sqlite3.Connection) -> Setting | None:
            row = conn.execute(SQL["setting"], (name,)).fetchone()
            return None if row is None else Setting(row["value"], row["fence"])

        return await self._run(read)

    async def write_setting(self, name: str, value: str, fence: int) -> bool:
        def store(conn: sqlite3.Connection) -> bool:
            with self._write(conn):
                return conn.execute(SQL["write_setting"], (name, value, fence)).rowcount == 1

        return await self._run(store)

    # -- events ------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: Sequence[Event]) -> None:
        def ports(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(SQL["ports"], (self._boot, time.monotonic())).fetchall()
            return [r["port"] for r in rows]

        if not events:
            return
        payloads = [json.dumps({"kind": event.kind, "key": event.key}).encode() for event in events]
        for port in await self._run(ports):
            for payload in payloads:
                with contextlib.suppress(OSError):
                    self._send.sendto(payload, ("127.0.0.1", port))

    async def subscribe(self, runner: RunnerInfo, callback: Callable[[Event], None]) -> None:
        self._callbacks.append(callback)
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _EventProtocol(self._deliver), local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        port = transport.get_extra_info("sockname")[1]

        def register(conn: sqlite3.Connection) -> None:
            self.locks.hold(runner.id)
            with self._write(conn):
                conn.execute(
                    SQL["register"],
                    (runner.id, runner.label, runner.pid, self._boot,
                     time.monotonic() + 30.0, port),
                )

        await self._run(register)

    def _deliver(self, event: Event) -> None:
        for callback in list(self._callbacks):
            callback(event)

    # -- watching a holder die -----------------------------------------------------

    def _watch_holder(self, owner: str, pid: int, key: str) -> None:
        keys = self._watched.get(owner)
        if keys is not None:
            keys.add(key)
            return
        self._watched[owner] = {key}
        task = asyncio.get_running_loop().create_task(self._await_death(owner, pid))
        self._watch_tasks.add(task)
        task.add_done_callback(self._watch_tasks.discard)

    async def _await_death(self, owner: str, pid: int) -> None:
        try:
            await self.locks.wait_for_death(owner, pid)
        finally:
            keys = self._watched.pop(owner, set())
        for key in keys:
            self._deliver(Event("released", key))


def _transient(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _EventProtocol(asyncio.DatagramProtocol):
    def __init__(self, deliver: Callable[[Event], None]) -> None:
        self._deliver = deliver

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            message = json.loads(data)
            event = Event(str(message["kind"]), str(message["key"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed event datagram from %s", addr)
            return
        if event.kind in Event.KINDS:
            self._deliver(event)

