"""The one owner of a runner's leases: it asks for many in one call, renews every lease
held in one call, and gives many back in one call.

Keepers ask it for their lease (``acquire``) and are answered; it tells them what their
renewal found (``LoopKeeper.lose``). Requests that arrive while a batch is out go in the
next one, so thousands of loops starting at once cost a few round trips; the renewer
extends every held lease about every third of its TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from typing import Protocol, TypeVar

from ostinato.coordinators.protocol import Coordinator, Denied, Event, Grant, Renewal, RunnerInfo
from ostinato.errors import CoordinatorUnavailable
from ostinato.host import FAREWELL
from ostinato.keeper import LoopKeeper
from ostinato.logs import fields
from ostinato.loop import REVOKED, LocalLease
from ostinato.standbys import Standbys

log = logging.getLogger("ostinato.runner")
T = TypeVar("T")

#: The most lease requests sent in one call.
ACQUIRE_BATCH = 1000
#: The most leases given back in one call.
RELEASE_BATCH = 2000
#: From this many loops, a runner that owns its process keeps the objects of its start out
#: of the garbage collector's rounds (``gc.freeze``, which acts on the whole process): once
#: its loops are set up, and again once every loop is held here or waits quietly for
#: another runner, or after ``SETTLE_WITHIN``.
FREEZE_FROM = 1000
SETTLE_WITHIN = 60.0
#: Such a runner also collects its youngest objects only once this many more have been
#: made than freed (700 by default). Each pass leaves a few objects that outlive a
#: collection or two (the timer of its next pass, its futures): at 10,000 loops they made
#: five full rounds a minute over 110,000 objects, about 1 % of a core, for no garbage.
YOUNG_COLLECTED_AT = 10_000


def freeze_gc() -> None:
    """Keep every object made so far out of the collector's rounds, and collect the young
    ones less often (unless the process already set that threshold higher)."""
    gc.freeze()
    young, *older = gc.get_threshold()
    if young < YOUNG_COLLECTED_AT:
        gc.set_threshold(YOUNG_COLLECTED_AT, *older)


def _next_batch(waiting: dict[str, T], size: int) -> dict[str, T]:
    """The first ``size`` of ``waiting`` (in the order they came), taken out of it."""
    batch = dict(itertools.islice(waiting.items(), size))
    for key in batch:
        del waiting[key]
    return batch


class Owner(Protocol):
    """The runner, as its leases see it."""

    coordinator: Coordinator
    info: RunnerInfo
    @property
    def keepers(self) -> Mapping[str, LoopKeeper]: ...

    stopping: bool
    freeze_gc: bool
    standbys: Standbys
    calls: Counter[str]
    loop: asyncio.AbstractEventLoop

    async def wait(self, seconds: float, *early: asyncio.Event) -> None: ...


class Leases:
    """The leases of ``runner``'s loops; ``shortest`` is the shortest lease among them."""

    def __init__(self, runner: Owner, shortest: float) -> None:
        self.runner = runner
        self._shortest_lease = shortest
        #: Leases renewed since start (metrics).
        self.renewals = 0
        self._renew_now = asyncio.Event()
        self._granted = asyncio.Event()
        #: When the renewer's next round is due (monotonic).
        self._due = float("inf")
        #: Lease requests waiting for the next batch: key -> (ttl, answer).
        self._wanted: dict[str, tuple[float, asyncio.Future[Grant | Denied]]] = {}
        #: Of those, the ones an event said may be free: they go in the next batch first.
        self._urgent: dict[str, tuple[float, asyncio.Future[Grant | Denied]]] = {}
        self._asking: asyncio.Future[None] | None = None
        #: Leases given back, waiting for the next batch: key -> (fence, done).
        self._returned: dict[str, tuple[int, asyncio.Future[None]]] = {}
        self._releasing: asyncio.Future[None] | None = None
        # The earliest a lease kept by the last renewal falls due again.
        self._earliest_due = math.inf
        # The leases granted here, by key, with their keepers: a renewal round and the
        # balance count look at these, not at every loop hosted (at 100,000 loops, most of
        # them held elsewhere, a scan of every keeper per round was the runner's hot spot).
        # A lease its keeper has let go, lost or had revoked is dropped when next looked at.
        self._held: dict[str, tuple[LoopKeeper, LocalLease]] = {}

    def renew_now(self) -> None:
        """Renew every lease at once (a loop was paused or revoked: its holder learns now)."""
        self._renew_now.set()

    async def acquire(self, key: str, ttl: float) -> Grant | Denied:
        """Ask for the lease of ``key``: requests that arrive while a batch is out are sent
        together in the next one (one call, on SQLite one transaction), so thousands of
        loops starting at once cost a few round trips, not thousands."""
        return await self.request(key, ttl)

    def request(self, key: str, ttl: float, *, urgent: bool = False) -> asyncio.Future[Grant | Denied]:
        """``acquire`` with no coroutine: the answer comes in the future returned (a runner
        asks so for loops that have no task yet). An ``urgent`` request (its lease may be
        free: a standby woken by an event or by its owner's silence) goes in the next batch,
        before those that were already waiting."""
        future: asyncio.Future[Grant | Denied] = self.runner.loop.create_future()
        self._urgent.pop(key, None)
        self._wanted.pop(key, None)
        (self._urgent if urgent else self._wanted)[key] = (ttl, future)
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self._ask_in_batches())
        return future

    async def answered(self, within: float) -> None:
        """Wait, at most ``within`` seconds, until every request made so far is answered and
        its answer taken in (a runner stopping starts the tasks of loops just granted, which
        then let their leases go)."""
        if self._asking is not None and not self._asking.done():
            await asyncio.wait({self._asking}, timeout=within)
        await asyncio.sleep(0)  # the answers' callbacks run

    def hurry(self, key: str) -> bool:
        """Put the waiting request for ``key``, if there is one, in the next batch: an event
        says its lease may be free (a runner joining a fleet asks for every loop once, in
        batches, and the loops handed to it must not wait for the end of that queue)."""
        request = self._wanted.pop(key, None)
        if request is None:
            return False
        self._urgent[key] = request
        return True

    async def _ask_in_batches(self) -> None:
        await asyncio.sleep(0)  # the requests of this turn of the event loop go together
        while self._urgent or self._wanted:
            batch = _next_batch(self._urgent, ACQUIRE_BATCH)
            batch.update(_next_batch(self._wanted, ACQUIRE_BATCH - len(batch)))
            sent = time.monotonic()
            try:
                self.runner.calls["acquire"] += 1
                answers = await self.runner.coordinator.acquire_many(
                    self.runner.info, {key: ttl for key, (ttl, _) in batch.items()}
                )
            except Exception as exc:  # the same answer for everyone in the batch
                for _, future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for key, (_, future) in batch.items():
                answer = answers[key]
                if isinstance(answer, Grant) and (answer.sent is None or answer.sent < sent):
                    # The claim began no sooner than the batch left, whenever its keeper
                    # asked: a request that waited for an earlier batch loses nothing.
                    answer = dataclasses.replace(answer, sent=sent)
                if not future.done():
                    future.set_result(answer)

    def freezes_gc(self) -> bool:
        """Whether this runner keeps the objects of its start out of the collector's rounds."""
        return self.runner.freeze_gc and len(self.runner.keepers) >= FREEZE_FROM

    async def renew_forever(self) -> None:
        began, frozen = time.monotonic(), False
        while not self.runner.stopping:
            self._renew_now.clear()
            started = time.monotonic()
            held = await self.renew_once()
            settled = held + self.runner.standbys.quiet >= len(self.runner.keepers)
            # Asked each round: the members of a ``keys=`` loop come after the start.
            if not frozen and self.freezes_gc() and (settled or started - began > SETTLE_WITHIN):
                # The keepers, the leases they hold and the standbys' records now live as
                # long as the runner: the collector need not look at them again (at 10,000
                # loops its full rounds over them took a third of the runner's CPU; in a
                # fleet of 100,000, most of it).
                freeze_gc()
                frozen = True
            await self._until_renewal_due(started)

    async def _until_renewal_due(self, started: float) -> None:
        """Wait until a held lease is a third of the way through, counted from when it was
        last asked for, and at most a third of the shortest lease from ``started``, so a
        slow coordinator does not stretch the pace. A lease granted late in its life (its
        request waited, or took two long round trips) is renewed as soon as it arrives,
        not at the next regular turn, by which time it may have run out."""
        regular = started + self._shortest_lease / 3
        # Never sooner than this after the last start, whatever a lease says: no spinning.
        floor = started + self._shortest_lease / 100
        # Found by the round's renewal, over every lease it kept; a grant since only lowers
        # it (``lease_granted``).
        self._due = min(regular, self._earliest_due)
        while not self.runner.stopping and not self._renew_now.is_set():
            self._granted.clear()
            wait = max(self._due, floor) - time.monotonic()
            if wait <= 0:
                return
            await self.runner.wait(wait, self._renew_now, self._granted)

    def granted(self, keeper: LoopKeeper, lease: LocalLease) -> None:
        """``keeper`` got ``lease``: the renewer wakes if it falls due before its next turn."""
        self._held[keeper.key] = (keeper, lease)
        self._earliest_due = min(self._earliest_due, lease.renew_at)
        if lease.renew_at < self._due:
            self._due = lease.renew_at
            self._granted.set()

    def ended(self, key: str, lease: LocalLease) -> None:
        """The keeper of ``key`` no longer holds ``lease`` (let go, lost or revoked)."""
        found = self._held.get(key)
        if found is not None and found[1] is lease:
            del self._held[key]

    def count(self) -> int:
        """How many leases are held now."""
        return len(self._held)

    def held(self) -> dict[str, tuple[LoopKeeper, LocalLease]]:
        """The leases held now, by key, with their keepers."""
        return {
            key: (keeper, lease) for key, (keeper, lease) in self._held.items()
            if keeper.lease is lease and lease.deadline != REVOKED
        }

    async def renew_once(self) -> int:
        """Extend every lease held here; a lease whose renewal fails stops its passes at once.
        Returns how many were kept."""
        self._earliest_due = math.inf
        held = self.held()
        if not held:
            return 0
        request = {key: (lease.fence, lease.ttl) for key, (_, lease) in held.items()}
        # The call must not outlive the latest lease: past that, every answer is moot. A
        # lease that runs out sooner stops its own passes meanwhile; cutting the call
        # short for it would cost the others their renewal (on PostgreSQL, their locks).
        latest = max(lease.deadline for _, lease in held.values())
        sent = time.monotonic()
        self.runner.calls["renew"] += 1
        try:
            answers = await asyncio.wait_for(
                self.runner.coordinator.renew(self.runner.info, request), timeout=max(latest - sent, 0.001)
            )
        except (CoordinatorUnavailable, TimeoutError) as exc:
            why = str(exc) or "the renewal timed out"
            for keeper, _ in held.values():
                keeper.lose(f"coordinator unreachable: {why}")
            return 0
        earliest, kept = math.inf, 0
        for key, answer in answers.items():
            keeper, lease = held[key]
            if keeper.lease is not lease:
                continue
            if answer is Renewal.HELD:
                lease.extend(sent)
                kept += 1
                self.renewals += 1
                if lease.renew_at < earliest:
                    earliest = lease.renew_at
            elif answer is Renewal.PAUSED:
                keeper.paused = True
                keeper.lose("the loop was paused")
            else:
                keeper.lose("another runner holds it now, or it was revoked", step_aside=True)
        self._earliest_due = min(self._earliest_due, earliest)  # grants since lowered it
        return kept

    async def give_back(self, key: str, lease: LocalLease) -> None:
        """Release a lease this runner no longer needs and tell standbys at once. Leases given
        back while a batch is out go together in the next one (one call, and one for the
        events): a runner stopping with thousands of loops lets them all go within its
        farewell, where one call each left most of them to expire."""
        future: asyncio.Future[None] = self.runner.loop.create_future()
        self._returned[key] = (lease.fence, future)
        if self._releasing is None or self._releasing.done():
            self._releasing = asyncio.ensure_future(self._release_in_batches())
        await future

    async def _release_in_batches(self) -> None:
        await asyncio.sleep(0)  # the leases given back in this turn of the event loop go together
        while self._returned:
            batch = _next_batch(self._returned, RELEASE_BATCH)
            fences = {key: fence for key, (fence, _) in batch.items()}
            try:
                await self._release(fences)
            finally:
                for _, future in batch.values():
                    if not future.done():
                        future.set_result(None)

    async def _release(self, fences: dict[str, int]) -> None:
        runner = self.runner
        try:
            async with asyncio.timeout(FAREWELL if runner.stopping else None):
                runner.calls["release"] += 1
                released = await runner.coordinator.release_many(runner.info, fences)
                if released:
                    await runner.coordinator.publish_many(
                        [Event("released", key) for key in fences if key in released]
                    )
        except (CoordinatorUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {FAREWELL}s"
            for key, fence in fences.items():
                log.warning("%s: could not release the lease, it will expire: %s", key, why,
                            extra=fields("release_failed", loop=key, fence=fence,
                                         runner=runner.info.label))
            return
        for key, fence in fences.items():
            if key in released:
                log.info("%s: lease released (fence %d)", key, fence,
                         extra=fields("lease_released", loop=key, fence=fence,
                                      runner=runner.info.label))
