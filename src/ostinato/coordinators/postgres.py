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

A runner asks for many leases in one statement (``acquire_many``: rows locked in key
order, as renewals lock them), and marks the grants with their advisory locks in one more.

The statements are in ``postgres_sql``; the connections, their turns and the session
bound in ``postgres_connections``; what a refusal leads to (sightings, silent owners,
waiting for a holder's lock) in ``postgres_standbys``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import operator
import time
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg.rows import DictRow

from ostinato.coordinators.postgres_connections import (
    RENEWAL,
    REQUEST,
    URGENT,
    Connection,
    lock_id,
)
from ostinato.coordinators.postgres_sql import STAT_COLUMNS
from ostinato.coordinators.postgres_standbys import PostgresStandbys
from ostinato.coordinators.protocol import (
    Denied,
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
from ostinato.errors import CoordinatorUnavailable

log = logging.getLogger("ostinato.postgres")

#: How soon a request whose row another statement had locked (and skipped) is asked again.
BUSY_RETRY = 0.05

#: The per-key columns of the batched acquire statement, and the parameter each comes from.
_BATCH_COLUMNS = (("ttls", "ttl"), ("seen_fences", "seen_fence"), ("seen_expires", "seen_expires"),
                  ("silent", "silent"), ("silent_counts", "silent_count"),
                  ("silent_ttls", "silent_ttl"), ("probes", "probe"))


#: A report's fields of one loop, in the order of the statement's columns.
_REPORTED = operator.attrgetter("key", "passes", "errors", *STAT_COLUMNS)


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class PostgresCoordinator(PostgresStandbys):
    """Leases in table rows judged by the server's clock; advisory locks speed up failover."""

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
            self._forget_claim(key)
            return await self._granted(key, runner, row, params["locked"], sent, quiet)
        if row is None:  # a first grant raced ours and is not visible yet
            return Denied(holder=None, expires_in=None)
        return await self._refused(key, runner, ttl, row, params)

    async def acquire_many(
        self, runner: RunnerInfo, requests: Mapping[str, float]
    ) -> dict[str, Grant | Denied]:
        """Leases this session holds no lock for are asked for in one statement, their first
        grants (keys without a row) in a second, and the grants' locks taken in a third;
        the others (asked again by their holder) one by one, by ``acquire``."""
        again = [key for key in requests if key in self._holders]
        fresh = {key: ttl for key, ttl in requests.items() if key not in self._holders}
        answers: dict[str, Grant | Denied] = {}
        if fresh:
            answers.update(await self._acquire_fresh(runner, fresh))
        for key in again:
            answers[key] = await self.acquire(key, runner, requests[key])
        return {key: answers[key] for key in requests}

    async def _acquire_fresh(
        self, runner: RunnerInfo, requests: Mapping[str, float]
    ) -> dict[str, Grant | Denied]:
        quiet = self._quiet.wanted()
        params = {key: {"key": key, "owner": runner.id, "holder": runner.label, "ttl": ttl,
                        "dead": None, "dead_fence": None, "probe": lock_id(self.schema, key),
                        "locked": False, "quiet": quiet, **self._unchanged(key), **self._proof(key)}
                  for key, ttl in requests.items()}
        keys = list(requests)
        async with self._session(priority=REQUEST) as conn:
            sent = time.monotonic()
            cursor = await self._run(conn, "acquire_many", {
                "owner": runner.id, "holder": runner.label, "quiet": quiet, "keys": keys,
                **{column: [params[key][name] for key in keys] for column, name in _BATCH_COLUMNS},
            })
            rows: dict[str, dict[str, Any]] = {row["key"]: row for row in await cursor.fetchall()}
            missing = [key for key in keys if key not in rows]
            if missing:
                cursor = await self._run(conn, "acquire_new", {
                    "owner": runner.id, "holder": runner.label, "quiet": quiet, "keys": missing,
                    "ttls": [requests[key] for key in missing],
                })
                for row in await cursor.fetchall():
                    rows[row["key"]] = {**row, "granted": True, "busy": False}
        granted = {key: row for key, row in rows.items() if row["granted"]}
        answers = await self._granted_many(runner, granted, sent, quiet)
        for key, ttl in requests.items():
            if key not in rows:  # a first grant raced ours and is not visible yet
                answers[key] = Denied(holder=None, expires_in=None)
            elif rows[key]["busy"]:  # another statement had the row: nothing seen, ask soon
                answers[key] = Denied(holder=None, expires_in=BUSY_RETRY)
            elif not rows[key]["granted"]:
                try:
                    answers[key] = await self._refused(key, runner, ttl, rows[key], params[key])
                except CoordinatorUnavailable:  # taking it from a dead holder failed: later
                    answers[key] = Denied(holder=rows[key]["holder"], expires_in=None)
        return answers

    async def _granted_many(
        self, runner: RunnerInfo, rows: Mapping[str, Any], sent: float, quiet: float
    ) -> dict[str, Grant | Denied]:
        """Fresh grants, their rows marked with advisory locks taken on the lease connection
        as far as the budget goes; past it, or without a lease connection, granted unlocked
        (standbys then wait for the lease to expire; a renewal takes a lock later if room)."""
        room = max(0, self.locks - len(self._holders))
        marking = dict(itertools.islice(((key, int(row["fence"])) for key, row in rows.items()), room))
        answers: dict[str, Grant | Denied] = {}
        for key, row in rows.items():
            self._forget_claim(key)
            fence = int(row["fence"])
            if key not in marking:
                self._unbound[key] = fence
            answers[key] = Grant(fence=fence, last_start=row["last_start"], sent=sent,
                                 bound=self.bound if key in marking else None)
        if not marking:
            return answers
        asked = False
        try:
            async with self._session(self._lease) as conn:
                asked = True
                with self._promising(quiet):
                    cursor = await self._run(conn, "mark_many", {
                        "keys": list(marking), "fences": list(marking.values()),
                        "locks": [lock_id(self.schema, key) for key in marking],
                        "owner": runner.id, "quiet": quiet,
                    })
                    marks = await cursor.fetchall()
                    for mark in marks:
                        if mark["marked"]:
                            self._held(mark["key"], runner, marking[mark["key"]], quiet)
                stray = [lock_id(self.schema, m["key"]) for m in marks if m["ok"] and not m["marked"]]
                if stray:
                    await self._run(conn, "unlock", {"locks": stray})
        except CoordinatorUnavailable as exc:
            # Once asked, rows may be marked with locks that went with the connection.
            if asked or self._closed:
                raise
            log.info("%d lease(s) granted without their advisory locks (%s)", len(marking), exc)
        return answers

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
        # As long as the leases last (the caller stops waiting at the latest deadline): a
        # busy server slows a renewal of thousands of leases past ``timeout``, and cutting it
        # short there lost them all although they had most of their time left.
        patience = max(ttl for _, ttl in leases.values())
        async with self._session(self._lease, priority=RENEWAL, patience=patience) as conn:
            with self._promising(quiet):
                holders = self._holders
                cursor = await self._run(conn, "renew", {
                    "keys": "\n".join(leases),
                    "fences": ",".join([str(fence) for fence, _ in leases.values()]),
                    "ttls": ",".join([repr(float(ttl)) for _, ttl in leases.values()]),
                    "locks": ",".join(["" if lock is None else str(lock)
                                       for lock in self._locks_to_take(leases)]),
                    "owner": runner.id,
                    "mine": ",".join(["t" if holders.get(key) == (runner.id, fence) else "f"
                                      for key, (fence, _) in leases.items()]),
                    "quiet": quiet,
                })
                told = await cursor.fetchall()
            answers = dict.fromkeys(leases, Renewal.HELD)
            given_up: dict[str, int] = {}
            for row in told:
                key, fence = row["key"], leases[row["key"]][0]
                if row["paused"] is None or row["paused"]:
                    answers[key] = Renewal.LOST if row["paused"] is None else Renewal.PAUSED
                    self._unbound.pop(key, None)
                    given_up[key] = fence
                else:
                    self._held(key, runner, fence, quiet)
            await self._unlock(conn, runner, given_up)
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
        rows = sorted(map(_REPORTED, stats), key=operator.itemgetter(0))
        try:
            params["rows"] = json.dumps(rows, allow_nan=False)
        except ValueError:  # JSON has no infinity: such a figure is left out, as unknown
            params["rows"] = json.dumps([[_finite(value) for value in row] for row in rows])
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
