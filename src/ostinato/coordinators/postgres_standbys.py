"""What a PostgreSQL coordinator does with a refusal (``postgres``): it notes the claim it
saw (``Sightings``) and the owner that made it (``Silence``), waits for the holder's
advisory lock on a connection of its own, and takes the lease of a holder whose session
ended once the lock has been free for the row's quiet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

import psycopg
from psycopg.rows import DictRow

from ostinato.coordinators.clocks import Sightings, Silence
from ostinato.coordinators.postgres_connections import Connection, PostgresConnections, log
from ostinato.coordinators.protocol import Denied, Event, Grant, RunnerInfo
from ostinato.coordinators.quiet import MIN_QUIET

# A refused standby waits for each holder's lock on a connection of its own, so
# the waits are capped to spare the server's connection slots; past the cap a
# standby retries when the lease expires, as it would without advisory locks.
MAX_WAITERS = 4
#: A wait for a holder's lock is a statement, and a running statement holds a snapshot that
#: keeps VACUUM from removing any row version the whole database discards meanwhile: one
#: wait lasting as long as its holder (days) bloats every table. So it waits this long at a
#: time (the lock timeout), then again.
WAIT_SLICE = 1.0


class PostgresStandbys(PostgresConnections):
    """The refusals side of the PostgreSQL coordinator."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # Claims seen on refusals, so that expiry is judged on this host's clock.
        self._sightings = Sightings()
        # The owner whose lock each waiter waits for.
        self._waiting_on: dict[str, str | None] = {}
        # Owners' activity counts as read, and the owner each refusal named.
        self._silence = Silence()
        self._claimed_by: dict[str, str] = {}
        # The claim (fence, expiry) first refused here from an unlocked row, by key.
        self._unlocked: dict[str, tuple[Any, Any]] = {}

    async def _refused(
        self, key: str, runner: RunnerInfo, ttl: float, row: DictRow, params: dict[str, Any]
    ) -> Grant | Denied:
        """What a refusal means for ``key``: paused, a claim to see out, a holder's lock to
        wait for, or a dead holder's lease to take now."""
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
                self._watch(key, params["probe"], row["owner"], row["fence"])
            elif (left := self._quiet_left(key, row)) > 0:
                # The holder's session ended: ask again when the quiet is over, whatever
                # its owner's activity count says (no ``owner``).
                return Denied(holder=row["holder"], expires_in=left)
            elif (taken := await self._take_from_dead(key, runner, params["probe"], row, params)) is not None:
                return taken
        # A standby waits quietly (for the holder's silence, or the lock watched above) on a
        # locked row: its holder marked it, so it knows it holds it. An unlocked row may be a
        # grant whose reply was lost: an active owner that does not know it holds it never
        # falls silent, so only the claim's own sightings can take it. Once such a row was
        # renewed under the same fence (its holder knows), it is held past its owner's lock
        # budget, and the standby waits quietly on it too.
        claim = (row["fence"], row["expires"])
        seen = self._unlocked.get(key)
        settled = row["locked"] or (seen is not None and seen[0] == claim[0] and seen[1] != claim[1])
        if row["locked"]:
            self._unlocked.pop(key, None)
        elif seen is None or seen[0] != claim[0]:
            self._unlocked[key] = claim
        return Denied(holder=row["holder"], expires_in=matures_in, owner=owner if settled else None)

    def _forget_claim(self, key: str) -> None:
        """``key`` was granted here: what refusals said of its last claim no longer counts."""
        self._sightings.forget(key)
        self._claimed_by.pop(key, None)
        self._unlocked.pop(key, None)

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
            conn = await self._connect(statement_timeout=WAIT_SLICE)
            while True:
                try:
                    await conn.execute("SELECT pg_advisory_lock(%s)", [lock])
                    break
                except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                    continue  # a slice of the wait over, the holder still there
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
