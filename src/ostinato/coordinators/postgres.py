"""``postgresql://``: leases as rows in a PostgreSQL table shared by runners on many hosts.

Each loop is one row of ``<schema>.loops``; the server's ``clock_timestamp()``
decides when a claim has expired, and one ``INSERT ... ON CONFLICT DO UPDATE
... WHERE`` both grants the lease and bumps its fence.

The row is the authority; session advisory locks only make failover faster.
A coordinator keeps two connections. The *lease* connection carries what keeps
a lease: when this runner is granted one it takes a session-level advisory lock
for that loop there and marks the row ``locked``, and renewals and releases run
there too, ahead of anything else. The server frees the locks when that
connection ends (the runner was killed, or its connection dropped); the runner
is told at once (``revoked``). Renewals refuse a ``locked`` row this session no
longer holds the lock of, so a connection that died and was replaced shows up
as a lost lease. The *main* connection carries the rest: lease requests,
reports, status and events, with requests from standby loops last in line, so
that a slow network delays a takeover but never a renewal.

A standby may take an unexpired lease only from a row marked ``locked`` whose
lock has been free for the row's ``quiet``. A freed lock proves only that the
server ended the holder's session, not that the holder heard of it: a holder
cut off from the server, whose session the server then ends (a keepalive, a
timeout, a pooler, an operator), hears nothing. So a holder trusts its leases
only while its lease connection keeps answering: it sends a statement there
every ``BEAT``, and starts passes only within ``window - BOUND_MARGIN`` of the
send time of the last statement answered (``SessionBound``), where the window
is shorter than the quiet written in every row it holds (``quiet``). The session
ended after that answer, so by the time a standby may take a lease a cut-off
holder has stopped starting passes, and its async and isolated passes have been
stopped (``unconfirmed``). A standby that was refused waits for the holder's lock on
a connection of its own and announces ``released`` when the lock has been free
for ``MIN_QUIET``; it asks again after the rest of the row's quiet.

URL query parameters: ``schema`` (default ``ostinato``) names the schema the
tables live in, created on first use; ``timeout`` (seconds, default 2) bounds
connecting and every statement, so one renewal cannot outlive a short lease.
Events travel by LISTEN/NOTIFY on a channel named after the schema.
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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from ostinato.coordinators import redact
from ostinato.coordinators.network import EventFeed, take_options, unavailable
from ostinato.coordinators.postgres_sql import SQL, STAT_COLUMNS
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
    SessionBound,
    Sightings,
    hosts_from,
    hosts_text,
)
from ostinato.coordinators.quiet import BEAT, BOUND_MARGIN, MIN_QUIET, QuietBook, window_for
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
# A refused standby waits for each holder's lock on a connection of its own, so
# the waits are capped to spare the server's connection slots; past the cap a
# standby retries when the lease expires, as it would without advisory locks.
MAX_WAITERS = 8


def lock_id(schema: str, key: str) -> int:
    """The advisory lock (one signed bigint) of loop ``key`` in ``schema``."""
    digest = hashlib.blake2b(f"{schema}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# Whose turn comes first on a busy connection (lower first; in arrival order within one).
RENEWAL, URGENT, REQUEST = 0, 1, 2


class Link:
    """One connection and whose turn it is to use it: renewals first, a standby's lease
    requests last."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: Connection | None = None
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


class PostgresCoordinator(Coordinator):
    """Leases in table rows judged by the server's clock; advisory locks speed up failover."""

    def __init__(self, url: str) -> None:
        self.display_url = redact(url)
        self._url, options = take_options(url, {"schema": "ostinato"})
        self.schema, self.timeout = options["schema"], float(options["timeout"])
        if not SCHEMA_NAME.fullmatch(self.schema):
            raise ConfigurationError(
                f"bad PostgreSQL URL {self.display_url!r}: schema must be a plain name"
                " (letters, digits and underscores, at most 50)"
            )
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
        self._waiters: dict[str, asyncio.Task[None]] = {}
        # When a holder's lock was first seen free: (owner, fence) of its row -> monotonic time.
        self._freed: dict[str, tuple[str | None, int | None, float]] = {}
        # Claims seen on refusals, so that expiry is judged on this host's clock.
        self._sightings = Sightings()
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
        self, link: Link | None = None, *, priority: int = URGENT, tables: bool = True
    ) -> AsyncIterator[Connection]:
        """A connection (``main`` unless told), one caller at a time, with the schema
        made sure of first unless the statement uses no ``tables``. A failure drops it
        (the lease connection's advisory locks with it) and becomes
        ``CoordinatorUnavailable``."""
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
                    self._schema_ready = False  # after a reconnect, look again
                if tables and not self._schema_ready:
                    await self._ensure_schema(link.conn)
                    self._schema_ready = True
                async with asyncio.timeout(self.timeout * 2):
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
        names = {"loops": f'"{self.schema}".loops', "runners": f'"{self.schema}".runners'}
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

    # -- leases --------------------------------------------------------------------------

    async def acquire(self, key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        lock = lock_id(self.schema, key)
        params: dict[str, Any] = {"key": key, "owner": runner.id, "holder": runner.label,
                                  "ttl": ttl, "dead": None, "dead_fence": None, "probe": lock,
                                  **self._unchanged(key)}
        params["quiet"] = quiet = self._quiet.wanted()
        async with self._session(priority=URGENT if key in self._holders else REQUEST) as conn:
            sent = time.monotonic()
            params["locked"] = key in self._holders
            # A locked row asked for again takes the new quiet; other rows are not locked.
            with self._promising(quiet) if params["locked"] else contextlib.nullcontext():
                row = await self._fetch(conn, "acquire", params)
        if row is not None and row["granted"]:
            self._sightings.forget(key)
            return await self._granted(key, runner, row, params["locked"], sent, quiet)
        if row is None:  # a first grant raced ours and is not visible yet
            return Denied(holder=None, expires_in=None)
        if row["paused"]:
            return Denied(holder=None, expires_in=None, paused=True)
        # Seen now, at the latest: after the server ran the statement that last changed the row.
        matures_in = self._saw(key, row, ttl, time.monotonic())
        if row["locked"] and key not in self._holders:
            if not row["lock_free"]:
                self._watch(key, lock, row["owner"], row["fence"])
            elif (left := self._quiet_left(key, row)) > 0:
                return Denied(holder=row["holder"], expires_in=left)
            elif (taken := await self._take_from_dead(key, runner, lock, row, params)) is not None:
                return taken
        return Denied(holder=row["holder"], expires_in=matures_in)

    def _saw(self, key: str, row: DictRow, ttl: float, now: float) -> float:
        """Note the claim on ``key`` as seen ``now``; return how much longer it must stay
        unchanged before it may be taken (its holder has stopped by then)."""
        if row["owner"] is None or row["expires"] is None:
            self._sightings.forget(key)
            return 0.0
        claim_ttl = float(row["ttl"] if row["ttl"] is not None else ttl)
        return self._sightings.saw(key, (row["fence"], row["expires"]), claim_ttl, now)

    def _unchanged(self, key: str) -> dict[str, Any]:
        """The acquire statement's leave to take a claim seen unchanged for its TTL."""
        claim = self._sightings.unchanged(key, time.monotonic())
        if claim is None:
            return {"seen_fence": None, "seen_expires": None}
        return {"seen_fence": claim[0], "seen_expires": claim[1]}

    async def _take_from_dead(
        self, key: str, runner: RunnerInfo, lock: int, row: DictRow, params: dict[str, Any]
    ) -> Grant | None:
        """The holder's session is gone: take its lock on the lease connection, then its lease."""
        async with self._session(self._lease) as conn:
            sent = time.monotonic()
            took = await self._fetch(conn, "try_lock", {"lock": lock})
            if took is None or not took["ok"]:
                return None
            params.update(locked=True, dead=row["owner"], dead_fence=row["fence"], probe=None)
            with self._promising(params["quiet"]):
                again = await self._fetch(conn, "acquire", params)
            if again is not None and again["granted"]:
                self._held(key, runner, int(again["fence"]), params["quiet"])
                return Grant(fence=int(again["fence"]), last_start=again["last_start"], sent=sent,
                             bound=self.bound)
            await self._run(conn, "unlock", {"locks": [lock]})
        return None

    def _quiet_left(self, key: str, row: DictRow) -> float:
        """How much longer the lock of ``key``'s holder must stay free before its lease is
        taken (0: long enough): the quiet its row asks for. The first sighting starts the
        clock. The row cannot change meanwhile: only the ended session could."""
        now = time.monotonic()
        quiet = max(MIN_QUIET, float(row["quiet"] or 0.0))
        seen = self._freed.get(key)
        if seen is None or seen[:2] != (row["owner"], row["fence"]):
            self._freed[key] = (row["owner"], row["fence"], now)
            return quiet
        return max(0.0, seen[2] + quiet - now)

    async def _granted(
        self, key: str, runner: RunnerInfo, row: DictRow, locked: bool, sent: float, quiet: float
    ) -> Grant | Denied:
        """The row is ours with a new fence. Record it against the advisory lock the lease
        connection holds, or take that lock now and mark the row with it."""
        fence, lock = int(row["fence"]), lock_id(self.schema, key)
        grant = Grant(fence=fence, last_start=row["last_start"], sent=sent, bound=self.bound)
        if locked and key in self._holders:
            self._held(key, runner, fence, quiet)  # the same lock now guards the new fence
            return grant
        # Here ``locked`` means the lease connection, and the lock with it, was lost while
        # the row was being granted as locked: a standby would take it over at once.
        asked = False
        try:
            async with self._session(self._lease) as conn:
                asked = True
                with self._promising(quiet):
                    marked = await self._fetch(conn, "mark", {
                        "lock": lock, "key": key, "owner": runner.id, "fence": fence, "quiet": quiet
                    })
                if marked and marked["marked"]:
                    self._held(key, runner, fence, quiet)
                    return grant
                if marked and marked["ok"]:
                    await self._run(conn, "unlock", {"locks": [lock]})
                if locked:
                    await self._run(conn, "release", {"key": key, "owner": runner.id,
                                                      "fence": fence, "locks": []})
                    return Denied(holder=None, expires_in=None)
        except CoordinatorUnavailable as exc:
            # Once asked, the row may be marked with a lock that went with the connection.
            if locked or asked or self._closed:
                raise
            # Not asked (no lease connection to be had): granted all the same, only without
            # the lock, so standbys wait for the lease to expire; a renewal takes the lock
            # once the connection is back.
            log.info("%s: granted without its advisory lock (%s)", key, exc)
        return grant

    def _held(self, key: str, runner: RunnerInfo, fence: int, quiet: float) -> None:
        self._holders[key] = (runner.id, fence)
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

    # -- the session bound -------------------------------------------------------------------

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

    async def renew(
        self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
    ) -> dict[str, Renewal]:
        if not leases:
            return {}
        quiet = self._quiet.wanted()
        async with self._session(self._lease, priority=RENEWAL) as conn:
            with self._promising(quiet):
                cursor = await self._run(conn, "renew", {
                    "keys": list(leases), "fences": [fence for fence, _ in leases.values()],
                    "ttls": [float(ttl) for _, ttl in leases.values()],
                    "locks": [None if key in self._holders else lock_id(self.schema, key)
                              for key in leases],
                    "owner": runner.id,
                    "mine": [key for key, (fence, _) in leases.items()
                             if self._holders.get(key) == (runner.id, fence)],
                    "quiet": quiet,
                })
                kept = {row["key"]: row for row in await cursor.fetchall()}
            answers = {}
            for key, (fence, _) in leases.items():
                row = kept.get(key)
                answers[key] = (Renewal.LOST if row is None
                                else Renewal.PAUSED if row["paused"] else Renewal.HELD)
                if row is not None and row["locked"]:
                    self._held(key, runner, fence, quiet)
            await self._unlock(conn, runner, {
                key: leases[key][0] for key, answer in answers.items() if answer is not Renewal.HELD
            })
        return answers

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        async with self._session(self._lease) as conn:
            locks = [lock_id(self.schema, k) for k in self._forget(runner, {key: fence})]
            row = await self._fetch(
                conn, "release", {"key": key, "owner": runner.id, "fence": fence, "locks": locks}
            )
            return bool(row and row["released"])

    async def revoke(self, key: str) -> int | None:
        # The holder's session keeps its lock until its next renewal, answered LOST.
        async with self._session() as conn:
            row = await self._fetch(conn, "revoke", {"key": key})
        return None if row is None else int(row["fence"])

    def _forget(self, runner: RunnerInfo, fences: dict[str, int]) -> list[str]:
        """The keys among ``fences`` whose lock this session holds for that grant, no
        longer counted as held: the caller unlocks them."""
        gone = [key for key, fence in fences.items() if self._holders.get(key) == (runner.id, fence)]
        self._unheld(gone)
        return gone

    async def _unlock(self, conn: Connection, runner: RunnerInfo, fences: dict[str, int]) -> None:
        gone = self._forget(runner, fences)
        if gone:
            await self._run(conn, "unlock", {"locks": [lock_id(self.schema, k) for k in gone]})

    async def forget(self, key: str) -> bool:
        async with self._session() as conn:
            if await self._fetch(conn, "forget", {"key": key}) is not None:
                return True
            return await self._fetch(conn, "known", {"key": key}) is None  # unknown: nothing to do

    # -- reports and status ----------------------------------------------------------------

    async def report(self, runner: RunnerInfo, ttl: float, stats: Sequence[LoopStats]) -> None:
        params: dict[str, Any] = {"id": runner.id, "label": runner.label, "ttl": ttl,
                                  "hosts": hosts_text(runner)}
        for column in ("key", "passes", "errors", *STAT_COLUMNS):
            params[column] = [getattr(item, column) for item in stats]
        async with self._session() as conn:
            await self._run(conn, "report", params)

    async def runners(self) -> list[RunnerRecord]:
        async with self._session() as conn:
            rows = await (await self._run(conn, "runners")).fetchall()
        return [RunnerRecord(id=r["id"], label=r["label"], seen=r["seen"], hosts=hosts_from(r["hosts"]))
                for r in rows]

    async def set_paused(self, key: str, paused: bool) -> None:
        async with self._session() as conn:
            await self._run(conn, "pause", {"key": key, "paused": paused})

    async def loops(self) -> list[LoopRecord]:
        async with self._session() as conn:
            rows = await (await self._run(conn, "loops")).fetchall()
        return [
            LoopRecord(
                key=r["key"], fence=r["fence"], paused=r["paused"],
                holder=r["holder"] if r["held"] else None,
                held_since=r["held_since"] if r["held"] else None,
                passes=r["passes"], errors=r["errors"], **{c: r[c] for c in STAT_COLUMNS},
            )
            for r in rows
        ]

    # -- events --------------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        payload = json.dumps({"kind": event.kind, "key": event.key})
        async with self._session(tables=False) as conn:  # a wake-up costs no schema check
            await self._run(conn, "notify", {"channel": self.channel, "payload": payload})

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

    # -- waiting for a holder's lock ------------------------------------------------------------

    def _watch(self, key: str, lock: int, owner: str | None, fence: int | None) -> None:
        if (self._closed or not self._events.callbacks or key in self._waiters
                or len(self._waiters) >= MAX_WAITERS):
            return
        self._waiters[key] = asyncio.get_running_loop().create_task(
            self._await_holder(key, lock, owner, fence)
        )

    async def _await_holder(self, key: str, lock: int, owner: str | None, fence: int | None) -> None:
        """Announce ``released`` once the holder's lock has been free for ``MIN_QUIET``:
        its session ended."""
        conn: Connection | None = None
        try:
            conn = await self._connect(statement_timeout=0)
            await conn.execute("SELECT pg_advisory_lock(%s)", [lock])
            await conn.execute("SELECT pg_advisory_unlock(%s)", [lock])
            self._freed[key] = (owner, fence, time.monotonic())
            await asyncio.sleep(MIN_QUIET)
        except (psycopg.Error, OSError) as exc:
            # Only an accelerator: the standby still retries when the lease expires.
            log.debug("stopped waiting for the holder of %s: %s", key, self._unavailable(exc))
            return
        finally:
            if self._waiters.get(key) is asyncio.current_task():
                del self._waiters[key]
            if conn is not None:
                await self._close_quietly(conn)
        self._events.deliver(Event("released", key))

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
