"""The PostgreSQL coordinator's connections, which ``postgres.py`` builds its leases on.

Two connections, each taken in turns (``Link``): renewals first, a standby's lease
requests last. The *lease* connection holds the advisory locks of the leases granted
here; while it is idle it is watched, so that the runner hears ``revoked`` the moment
the server ends it, and it is heard from every ``BEAT`` (``_pulse``), which keeps the
session bound (``SessionBound``) that passes start within. The *main* connection
carries the rest. The schema is made sure of on first use, and after a reconnect.

Events travel by LISTEN/NOTIFY on a connection of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from ostinato.coordinators.clocks import SessionBound
from ostinato.coordinators.network import EventFeed, take_options, unavailable
from ostinato.coordinators.postgres_sql import SQL
from ostinato.coordinators.protocol import Coordinator, Event, RunnerInfo
from ostinato.coordinators.quiet import BEAT, BOUND_MARGIN, MIN_QUIET, QuietBook, window_for
from ostinato.coordinators.urls import redact
from ostinato.errors import ConfigurationError, CoordinatorUnavailable

log = logging.getLogger("ostinato.postgres")
Connection = psycopg.AsyncConnection[DictRow]

SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")
# Errors that mean "the server is not there right now" (QueryCanceled, from the
# statement timeout, is an OperationalError too).
UNREACHABLE = (psycopg.OperationalError, OSError)
#: What a server says at connect time when the URL, not the network, is wrong.
_REFUSALS = ("does not exist", "password authentication failed", "no pg_hba.conf entry")
# Schema creation is serialized on this two-int advisory key, a key space apart
# from the single-bigint keys of the lease locks.
SCHEMA_LOCK = (0x6F737469, 0x6E61746F)


def lock_id(schema: str, key: str) -> int:
    """The advisory lock (one signed bigint) of loop ``key`` in ``schema``."""
    digest = hashlib.blake2b(f"{schema}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


#: The most leases one coordinator holds with an advisory lock. Those fail over the moment
#: their holder's session ends; the others when their lease expires. The cap keeps the
#: server's shared lock table small, and the work of hearing from the session (every
#: locked lease waits while it is unheard) independent of the number of loops.
LOCKS = 256

# Whose turn comes first on a busy connection (lower first; in arrival order within one).
RENEWAL, URGENT, REQUEST = 0, 1, 2


class Link:
    """One connection and whose turn it is to use it: renewals first, a standby's lease
    requests last."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: Connection | None = None
        #: The server-side statement and lock timeouts set on ``conn`` (seconds).
        self.patience = 0.0
        self._busy = False
        self._queue: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def turn(self, priority: int) -> AsyncIterator[None]:
        if self._busy:
            waiter = asyncio.get_running_loop().create_future()
            heapq.heappush(self._queue, (priority, next(self._order), waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on()  # the turn came just as the caller gave up
                raise
        self._busy = True
        try:
            yield
        finally:
            self._pass_on()

    @property
    def idle(self) -> bool:
        return not self._busy

    def _pass_on(self) -> None:
        while self._queue:
            waiter = heapq.heappop(self._queue)[2]
            if not waiter.done():
                waiter.set_result(None)  # still busy: handed straight to the next caller
                return
        self._busy = False


class PostgresConnections(Coordinator):
    """The connections of a PostgreSQL coordinator: their turns, the schema, the lease
    session's bound and events."""

    def __init__(self, url: str) -> None:
        self.display_url = redact(url)
        self._url, options = take_options(url, {"schema": "ostinato", "locks": str(LOCKS)})
        self.schema, self.timeout = options["schema"], float(options["timeout"])
        if not SCHEMA_NAME.fullmatch(self.schema):
            raise ConfigurationError(
                f"bad PostgreSQL URL {self.display_url!r}: schema must be a plain name"
                " (letters, digits and underscores, at most 50)"
            )
        if not options["locks"].isdigit():
            raise ConfigurationError(
                f"bad PostgreSQL URL {self.display_url!r}: locks must be a whole number"
                f" (the most leases held with an advisory lock; 0 for none, default {LOCKS})"
            )
        #: At most this many leases are held with an advisory lock (and bound to the session).
        self.locks = int(options["locks"])
        self._password = urlsplit(url).password
        try:
            given = conninfo_to_dict(self._url)
        except psycopg.Error as exc:
            raise ConfigurationError(f"bad PostgreSQL URL {self.display_url!r}: {exc}") from None
        # Our settings join the URL's own rather than replace them.
        self._options = f"{given.get('options') or ''} -c statement_timeout=%d -c lock_timeout=%d"
        self._application = str(given.get("application_name") or "ostinato")
        self.channel = f"{self.schema}_events"
        names = {"s": sql.Identifier(self.schema), "channel": sql.Identifier(self.channel)}
        self._sql = {name: sql.SQL(text).format(**names) for name, text in SQL.items()}
        self._main, self._lease = Link("main"), Link("lease")
        self._schema_ready = False
        # Loops whose advisory lock the lease connection holds, with the grant it guards.
        self._holders: dict[str, tuple[str, int]] = {}
        # Grants (key -> fence) made without the session bound, past the lock budget: their
        # rows never take a lock, which would let a standby take them before they expire.
        self._unbound: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Task[None]] = {}
        # When a holder's lock was first seen free: (owner, fence) of its row -> monotonic time.
        self._freed: dict[str, tuple[str | None, int | None, float]] = {}
        self._events = EventFeed[Connection](
            f"ostinato-postgres-events:{self.schema}", self.display_url, self._notices,
            self._listen, self._close_quietly, UNREACHABLE, self._unavailable,
        )
        self._closed = False
        self._watched_fd: int | None = None
        #: How long the lease connection's session was last heard from; every grant carries it.
        self.bound = SessionBound(window_for(MIN_QUIET), BOUND_MARGIN)
        self._quiet = QuietBook()
        self._pulse_task: asyncio.Task[None] | None = None
        self._unheard = False
        self._lapse: asyncio.TimerHandle | None = None

    # -- connections -----------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> CoordinatorUnavailable:
        return unavailable("PostgreSQL", self.display_url, self._password, exc)

    async def _connect(self, statement_timeout: float | None = None) -> Connection:
        wait = round(1000 * (self.timeout if statement_timeout is None else statement_timeout))
        async with asyncio.timeout(self.timeout):
            return await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                prepare_threshold=None,  # prepared statements break behind poolers
                row_factory=dict_row,
                connect_timeout=max(2, math.ceil(self.timeout)),  # libpq's floor is 2
                options=self._options % (wait, wait),
                application_name=self._application,
            )

    @contextlib.asynccontextmanager
    async def _session(
        self, link: Link | None = None, *, priority: int = URGENT, tables: bool = True,
        patience: float | None = None,
    ) -> AsyncIterator[Connection]:
        """A connection (``main`` unless told), one caller at a time, with the schema
        made sure of first unless the statement uses no ``tables``. A failure drops it
        (the lease connection's advisory locks with it) and becomes
        ``CoordinatorUnavailable``.

        The statement is given ``timeout`` seconds, or ``patience`` where that is longer
        (a renewal may take as long as its leases last): in the server, whose statement
        timeout is raised for it on this connection and stays raised, and here."""
        link = link or self._main
        async with link.turn(priority):
            if self._closed:  # checked once it is our turn: close() may have come first
                raise CoordinatorUnavailable(f"the coordinator {self.display_url} is closed")
            if link is self._lease:
                self._unwatch_idle()
            try:
                if link.conn is None or link.conn.closed:
                    await self._drop(link)
                    link.conn = await self._connect()
                    link.patience = self.timeout
                    self._schema_ready = False  # after a reconnect, look again
                if tables and not self._schema_ready:
                    await self._ensure_schema(link.conn)
                    self._schema_ready = True
                limit = max(self.timeout, patience or 0.0)
                if limit > link.patience:
                    async with asyncio.timeout(self.timeout * 2):
                        await self._run(link.conn, "patience", {"ms": str(math.ceil(limit * 1000))})
                    link.patience = limit
                async with asyncio.timeout(max(self.timeout * 2, limit)):
                    sent = time.monotonic()
                    yield link.conn
                if link is self._lease:
                    self._quiet.took(time.monotonic() - sent)  # beats, renewals, marks alike
                    self._heard(sent)
            except UNREACHABLE as exc:
                await self._drop(link)
                raise self._unavailable(exc) from exc
            except asyncio.CancelledError:
                await self._drop(link)  # cut off mid-statement: its state is unknown
                raise
            finally:
                if link is self._lease:
                    self._watch_idle()  # does nothing once the connection is dropped

    def _watch_idle(self) -> None:
        """While the connection is idle, notice at once if the server ends it.

        Its advisory locks go with it, so a standby may take those loops over:
        the runner is told (``revoked``) so that it stops their passes now
        rather than at its next renewal.
        """
        conn = self._lease.conn
        if conn is None or conn.closed or not self._holders:
            return
        with contextlib.suppress(psycopg.Error, OSError, ValueError):
            self._watched_fd = conn.fileno()
            asyncio.get_running_loop().add_reader(self._watched_fd, self._idle_readable)

    def _unwatch_idle(self) -> None:
        if self._watched_fd is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._watched_fd)
            self._watched_fd = None

    def _idle_readable(self) -> None:
        conn = self._lease.conn
        self._unwatch_idle()
        if conn is None:
            return
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()  # a notice or a parameter change is harmless
            while pgconn.notifies() is not None:
                pass
            alive = pgconn.status == psycopg.pq.ConnStatus.OK
        except psycopg.Error:
            alive = False
        if alive:
            self._watch_idle()
            return
        lost = list(self._holders)
        log.warning("the connection holding the advisory locks of %d loop(s) was closed by the "
                    "server; their leases are given up", len(lost))
        self._lease.conn = None
        self.bound.reset()
        self._unheld(lost)
        asyncio.get_running_loop().create_task(self._close_quietly(conn))
        for key in lost:
            self._events.deliver(Event("revoked", key))

    async def _drop(self, link: Link) -> None:
        conn, link.conn = link.conn, None
        if link is self._lease:
            self._unwatch_idle()
            self.bound.reset()
            lost = list(self._holders)
            self._unheld(lost)
            # The advisory locks went with the connection, so a standby may take these
            # loops soon: the runner must stop their passes now, not at its next renewal.
            for key in lost:
                self._events.deliver(Event("revoked", key))
        if conn is not None:
            await self._close_quietly(conn)

    async def _ensure_schema(self, conn: Connection) -> None:
        names = {"loops": f'"{self.schema}".loops', "runners": f'"{self.schema}".runners',
                 "settings": f'"{self.schema}".settings', "activity": f'"{self.schema}".activity'}
        found = await self._fetch(conn, "exists", names)
        if found and found["ok"]:
            return
        # IF NOT EXISTS still races when runners start together: serialize on a lock.
        async with conn.transaction():
            await self._run(conn, "schema_lock", dict(zip("ab", SCHEMA_LOCK, strict=True)))
            await self._run(conn, "ddl")

    @staticmethod
    async def _close_quietly(conn: Connection) -> None:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()

    async def _run(
        self, conn: Connection, name: str, params: dict[str, Any] | None = None
    ) -> psycopg.AsyncCursor[DictRow]:
        return await conn.execute(self._sql[name], params)

    async def _fetch(self, conn: Connection, name: str, params: dict[str, Any]) -> DictRow | None:
        return await (await self._run(conn, name, params)).fetchone()

    async def open(self) -> None:
        try:
            async with self._session():
                pass
        except CoordinatorUnavailable as exc:
            # The server answered, and refused for a reason that waiting cannot fix.
            if any(words in str(exc) for words in _REFUSALS):
                raise ConfigurationError(f"{exc} (check the URL)") from None
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._waiters.values():
            task.cancel()
        if self._waiters:
            await asyncio.wait(list(self._waiters.values()), timeout=self.timeout)
        await self._events.stop(self.timeout)
        self._unwatch_idle()
        if self._lapse is not None:
            self._lapse.cancel()
        if self._pulse_task is not None:
            self._pulse_task.cancel()
            await asyncio.gather(self._pulse_task, return_exceptions=True)
        for link in (self._lease, self._main):
            async with link.turn(URGENT):
                await self._drop(link)

    # -- the session bound -------------------------------------------------------------------

    def _held(self, key: str, runner: RunnerInfo, fence: int, quiet: float) -> None:
        self._holders[key] = (runner.id, fence)
        self._unbound.pop(key, None)
        self._quiet.rows[key] = quiet
        self.bound.window = self._quiet.window()
        self._freed.pop(key, None)
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.cancel()
        if self._pulse_task is None or self._pulse_task.done():
            self._pulse_task = asyncio.get_running_loop().create_task(
                self._pulse(), name="ostinato-postgres-pulse"
            )

    @contextlib.contextmanager
    def _promising(self, quiet: float) -> Iterator[None]:
        """A write of ``quiet`` into rows is in flight: the window fits it from now on, and
        grows back only when the rows it reached are recorded (``_held``), never before."""
        with self._quiet.writing(quiet):
            self.bound.window = min(self.bound.window, self._quiet.window())
            yield

    def _unheld(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._holders.pop(key, None)
            self._quiet.rows.pop(key, None)
        self.bound.window = self._quiet.window()

    async def _pulse(self) -> None:
        """While the lease connection holds advisory locks, hear from its session every BEAT,
        and time the round trips (the quiet asked for in rows fits the slowest). A beat is
        sent only while the connection is idle: a renewal must never wait behind one on a
        slow link, and any statement answered there counts as a beat anyway."""
        while not self._closed and self._holders and self._lease.conn is not None:
            started = time.monotonic()
            if self._lease.idle and started - self.bound.heard >= BEAT:
                try:
                    async with self._session(self._lease, priority=RENEWAL, tables=False) as conn:
                        await conn.execute("SELECT 1")
                except CoordinatorUnavailable:
                    return  # dropped, and the runner told; the next lock held starts it again
            await asyncio.sleep(max(0.0, started + BEAT - time.monotonic()))

    def _heard(self, sent: float) -> None:
        """The lease connection's session answered a statement sent at ``sent``."""
        self.bound.confirm(sent)
        if self._unheard and self.bound.holds(time.monotonic()):
            self._unheard = False
            log.info("the session holding the advisory locks answers again: passes go on")
        if self._lapse is not None:
            self._lapse.cancel()
        due = self.bound.until - self.bound.margin - time.monotonic()
        self._lapse = asyncio.get_running_loop().call_later(max(0.0, due), self._lapsed)

    def _lapsed(self) -> None:
        """No answer in time: passes stop starting by themselves (``LocalLease.holds``);
        the runner is told too, so that it stops the passes it can stop."""
        self._lapse = None
        if self.bound.holds(time.monotonic()) or not self._holders:
            return
        log.warning("no answer from the session holding the advisory locks of %d loop(s) within "
                    "%.0f ms: their passes wait until it answers again (a standby may take them "
                    "if the server ended it)", len(self._holders),
                    1000 * (self.bound.window - BOUND_MARGIN))
        self._unheard = True
        for key in list(self._holders):
            self._events.deliver(Event("unconfirmed", key))

    # -- events --------------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: Sequence[Event]) -> None:
        if not events:
            return
        payloads = [json.dumps({"kind": event.kind, "key": event.key}) for event in events]
        async with self._session(tables=False) as conn:  # a wake-up costs no schema check
            await self._run(conn, "notify_many", {"channel": self.channel, "payloads": payloads})

    async def subscribe(self, runner: RunnerInfo, callback: Callable[[Event], None]) -> None:
        if self._closed:
            raise CoordinatorUnavailable(f"the coordinator {self.display_url} is closed")
        if not self._events.started:
            try:
                self._events.start(await self._listen())
            except UNREACHABLE as exc:
                raise self._unavailable(exc) from exc
        self._events.callbacks.append(callback)

    async def _listen(self) -> Connection:
        conn = await self._connect()
        try:
            await self._run(conn, "listen")
        except BaseException:
            await self._close_quietly(conn)
            raise
        return conn

    @staticmethod
    async def _notices(conn: Connection) -> AsyncIterator[str]:
        async for notice in conn.notifies():
            yield notice.payload

    # -- tests ---------------------------------------------------------------------------------

    async def drop_everything(self) -> None:
        """Drop this coordinator's schema and everything in it (for tests)."""
        try:
            conn = await self._connect()
        except UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        try:
            await self._run(conn, "drop")
        finally:
            await self._close_quietly(conn)
