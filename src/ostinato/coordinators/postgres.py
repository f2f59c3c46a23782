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

The statements are in ``postgres_sql``; the connections, their turns and the session
bound in ``postgres_connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import DictRow

from ostinato.coordinators.clocks import Sightings, Silence
from ostinato.coordinators.postgres_connections import (
    RENEWAL,
    REQUEST,
    URGENT,
    Connection,
    PostgresConnections,
    lock_id,
)
from ostinato.coordinators.postgres_sql import STAT_COLUMNS
from ostinato.coordinators.protocol import (
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
)
from ostinato.coordinators.quiet import MIN_QUIET
from ostinato.errors import CoordinatorUnavailable

log = logging.getLogger("ostinato.postgres")

# A refused standby waits for each holder's lock on a connection of its own, so
# the waits are capped to spare the server's connection slots; past the cap a
# standby retries when the lease expires, as it would without advisory locks.
MAX_WAITERS = 4


class PostgresCoordinator(PostgresConnections):
    """Leases in table rows judged by the server's clock; advisory locks speed up failover."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # Claims seen on refusals, so that expiry is judged on this host's clock.
        self._sightings = Sightings()
        # The owner whose lock each waiter waits for.
        self._waiting_on: dict[str, str | None] = {}
        # Owners' activity counts as read, and the owner each refusal named.
        self._silence = Silence()
        self._claimed_by: dict[str, str] = {}

    # -- leases --------------------------------------------------------------------------

    async def acquire(self, key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        lock = lock_id(self.schema, key)
        params: dict[str, Any] = {"key": key, "owner": runner.id, "holder": runner.label,
                                  "ttl": ttl, "dead": None, "dead_fence": None, "probe": lock,
                                  **self._unchanged(key), **self._proof(key)}
        params["quiet"] = quiet = self._quiet.wanted()
        async with self._session(priority=URGENT if key in self._holders else REQUEST) as conn:
            sent = time.monotonic()
            params["locked"] = key in self._holders
            # A locked row asked for again takes the new quiet; other rows are not locked.
            with self._promising(quiet) if params["locked"] else contextlib.nullcontext():
                row = await self._fetch(conn, "acquire", params)
        if row is not None and row["granted"]:
            self._sightings.forget(key)
            self._claimed_by.pop(key, None)
            return await self._granted(key, runner, row, params["locked"], sent, quiet)
        if row is None:  # a first grant raced ours and is not visible yet
            return Denied(holder=None, expires_in=None)
        if row["paused"]:
            return Denied(holder=None, expires_in=None, paused=True)
        # Seen now, at the latest: after the server ran the statement that last changed the row.
        matures_in = self._saw(key, row, ttl, time.monotonic())
        owner = row["owner"]
        if owner is None:
            self._claimed_by.pop(key, None)
        else:
            self._claimed_by[key] = owner
        if row["locked"] and key not in self._holders and len(self._holders) < self.locks:
            if not row["lock_free"]:
                self._watch(key, lock, row["owner"], row["fence"])
            elif (left := self._quiet_left(key, row)) > 0:
                # The holder's session ended: ask again when the quiet is over, whatever
                # its owner's activity count says (no ``owner``).
                return Denied(holder=row["holder"], expires_in=left)
            elif (taken := await self._take_from_dead(key, runner, lock, row, params)) is not None:
                return taken
        # A standby waits quietly only on a locked row: it has watched the lock above, or
        # the holder's silence tells. An unlocked row may be a grant not marked yet, whose
        # lock a later try watches.
        return Denied(holder=row["holder"], expires_in=matures_in,
                      owner=owner if row["locked"] else None)

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

    def _proof(self, key: str) -> dict[str, Any]:
        """The acquire statement's leave to take a claim of an owner seen silent for at least
        the claim's TTL (``Silence``)."""
        owner = self._claimed_by.get(key)
        proof = self._silence.proof(owner, time.monotonic())
        if proof is None:
            return {"silent": None, "silent_count": None, "silent_ttl": None}
        return {"silent": owner, "silent_count": proof[0], "silent_ttl": proof[1]}

    async def silence(self, owners: Collection[str]) -> dict[str, float]:
        owners = list(owners)
        if not owners:
            return {}
        async with self._session() as conn:
            cursor = await self._run(conn, "activity", {"owners": owners})
            counts = {row["owner"]: int(row["count"]) for row in await cursor.fetchall()}
        now = time.monotonic()
        self._silence.prune(now)
        return {owner: self._silence.saw(owner, counts.get(owner, -1), now) for owner in owners}

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
        if not locked and len(self._holders) >= self.locks:
            # Past the budget: an unlocked row, taken over only once it expires, so the
            # lease needs no session bound.
            self._unbound[key] = fence
            return dataclasses.replace(grant, bound=None)
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
                    "locks": self._locks_to_take(leases),
                    "owner": runner.id,
                    "mine": [self._holders.get(key) == (runner.id, fence)
                             for key, (fence, _) in leases.items()],
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
                elif row is None or row["paused"]:
                    self._unbound.pop(key, None)
            await self._unlock(conn, runner, {
                key: leases[key][0] for key, answer in answers.items() if answer is not Renewal.HELD
            })
        return answers

    def _locks_to_take(self, leases: Mapping[str, tuple[int, float]]) -> list[int | None]:
        """The advisory lock a renewal takes for each lease (``None``: none): a lease granted
        without one (its lease connection was down) takes it now, within the budget; one
        granted past the budget never does, for it has no session bound."""
        room = self.locks - len(self._holders)
        locks: list[int | None] = []
        for key, (fence, _) in leases.items():
            if room > 0 and key not in self._holders and self._unbound.get(key) != fence:
                locks.append(lock_id(self.schema, key))
                room -= 1
            else:
                locks.append(None)
        return locks

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        self._unbound.pop(key, None)
        async with self._session(self._lease) as conn:
            locks = [lock_id(self.schema, k) for k in self._forget(runner, {key: fence})]
            row = await self._fetch(
                conn, "release", {"key": key, "owner": runner.id, "fence": fence, "locks": locks}
            )
            return bool(row and row["released"])

    async def release_many(self, runner: RunnerInfo, leases: Mapping[str, int]) -> set[str]:
        if not leases:
            return set()
        for key in leases:
            self._unbound.pop(key, None)
        async with self._session(self._lease) as conn:
            locks = [lock_id(self.schema, k) for k in self._forget(runner, dict(leases))]
            row = await self._fetch(conn, "release_many", {
                "keys": list(leases), "fences": list(leases.values()), "owner": runner.id,
                "locks": locks,
            })
        return set(row["released"]) if row else set()

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
        # In key order, as a renewal locks its rows: no deadlock between the two.
        stats = sorted(stats, key=lambda item: item.key)
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

    # -- settings ------------------------------------------------------------------------------

    async def read_setting(self, name: str) -> Setting | None:
        async with self._session() as conn:
            row = await self._fetch(conn, "setting", {"name": name})
        return None if row is None else Setting(row["value"], int(row["fence"]))

    async def write_setting(self, name: str, value: str, fence: int) -> bool:
        async with self._session() as conn:
            row = await self._fetch(conn, "write_setting", {"name": name, "value": value, "fence": fence})
        return row is not None

    # -- waiting for a holder's lock ------------------------------------------------------------

    def _watch(self, key: str, lock: int, owner: str | None, fence: int | None) -> None:
        """Wait for the lock of ``key``'s holder, unless one of that holder's locks is waited
        for already: its session ending frees them all at once."""
        if (self._closed or not self._events.callbacks or key in self._waiters
                or len(self._waiters) >= MAX_WAITERS or owner in self._waiting_on.values()):
            return
        self._waiting_on[key] = owner
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
            if self._waiters.get(key) in (None, asyncio.current_task()):  # not replaced
                self._waiters.pop(key, None)
                self._waiting_on.pop(key, None)
            if conn is not None:
                await self._close_quietly(conn)
        # Its other leases last refused here went with the same session.
        others = [other for other, by in self._claimed_by.items() if by == owner and other != key]
        for other in [key, *others]:
            self._events.deliver(Event("released", other))
