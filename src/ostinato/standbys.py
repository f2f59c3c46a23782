"""Standbys that wait quietly: a loop whose lease another runner holds does not ask for it
again while that runner is seen active.

A runner stands by for every loop it hosts that another runner holds: in a fleet of ten
runners sharing 100,000 loops, 90,000 of them. Asking for each every third of its TTL would
be thousands of requests a second for nothing. Instead a standby refused by an owner is
parked here, with no task of its own (a task and its timers for each of 90,000 standbys
cost a runner hundreds of megabytes), and the runner reads the activity counts of the
owners waited on (``Coordinator.silence``) every tenth of its shortest lease, at most 0.25 s
apart: every grant and every renewal moves its owner's count. A parked standby's keeper
starts again when

* an event says its lease may be free (``released``, ``resumed``, ``revoked``),
* its owner has been silent for the lease's TTL: its claims may then be taken (the
  coordinator checks that the count is still the one it saw). Not every runner asks for
  every such loop at once: the live runners that can run it are ranked for each loop, the
  same way on every runner (rendezvous hashing), and the runner ranked first asks at once,
  the next ``RANK_STEP`` later, and so on. A runner killed in a fleet of ten leaves ten
  thousand loops of 100,000; all nine others asking for all of them made 90,000 requests
  at the moment they could first be taken, where ten thousand suffice. A runner that
  does not take its loops (dead too, or cut off) delays them by a step. Each runner
  times an owner's silence from its own first sight of the count, so a runner that came
  to stand by late (busy, or waiting for balance) sees the owner silent late: ranks are
  kept only where more than ``RANKED_FROM`` standbys wait on the owner, and a few ask at
  once, the first to see the owner silent taking the loop, or
* the events connection came back after a loss (``missed``), or
* it has waited ``patience()`` (randomly between half and all of it): an event lost
  otherwise costs at most that long.

On a coordinator that does not count activity (``silence`` answers ``None``) standbys ask
on their own, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Iterable
from typing import Protocol

from ostinato.coordinators.clocks import drift_margin
from ostinato.coordinators.protocol import Coordinator
from ostinato.errors import CoordinatorUnavailable

log = logging.getLogger("ostinato.runner")

#: How often the activity counts of the owners standbys wait on are read: a tenth of the
#: shortest lease, within these bounds. A standby wakes within about two of these of the
#: moment its owner has been silent for the TTL.
LOOK_EVERY = (0.05, 0.25)
#: Past the TTL and its drift margin, how much longer an owner must be silent before its
#: standbys ask: the acquire must find the silence at least as long as the claim's TTL,
#: with no rounding (the TTL travels in milliseconds) to refuse it.
MATURE = 0.01
#: How much later each runner asks for a silent owner's loop than the runner ranked just
#: before it for that loop: at most this, and at most this fraction of the lease.
RANK_STEP = (1.0, 0.1)
#: Standbys of a silent owner take their turns by rank only when more than this many of
#: them wait in this runner: a few requests more cost nothing, and the standby that saw the
#: owner fall silent first (its silence is timed from its own first sight of the owner's
#: count) takes the loop soonest.
RANKED_FROM = 100
#: A quiet standby asks anyway after about this long, in case an event was lost without
#: its connection dropping (a connection that drops and comes back wakes every standby)...
PATIENCE = 60.0
#: ...or longer in a big fleet, so that a runner's quiet standbys ask at most this many
#: times a second in all.
QUIET_ASKS = 20.0


def rank(key: str, me: str, rivals: Iterable[str]) -> int:
    """How many of ``rivals`` (runner ids) come before runner ``me`` for ``key``: the order
    is the same on every runner that knows the same runners, and spreads the keys evenly
    among them (rendezvous hashing)."""
    mine = _score(key, me)
    return sum(1 for rival in rivals if _score(key, rival) > mine)


def _score(key: str, runner: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{runner}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Waiter(Protocol):
    """A keeper standing by, as this module sees it."""

    #: The owner whose silence woke it, if that is why it asks.
    silent_owner: str | None
    #: Its lease's name, and its loop's (``app:loop``).
    key: str
    family: str

    def chance(self) -> None: ...


class Watcher(Protocol):
    """The runner, as its standbys see it."""

    coordinator: Coordinator
    stopping: bool

    async def wait(self, seconds: float, *early: asyncio.Event) -> None: ...

    def rank(self, key: str, family: str, owner: str) -> int:
        """How many live runners that can run ``key`` (``owner`` aside) come before this one
        for it: 0 for the first."""
        ...


class Standbys:
    """The quiet standbys of one runner, parked by the owner they wait on."""

    def __init__(self, runner: Watcher, shortest: float) -> None:
        self.runner = runner
        #: The shortest lease of the runner's loops.
        self.shortest = shortest
        self.look_every = min(max(shortest / 10, LOOK_EVERY[0]), LOOK_EVERY[1])
        #: Whether the coordinator counts its owners' activity (standbys may wait quietly).
        self.counted = False
        # By owner: each parked standby and the TTL of its lease.
        self._waiting: dict[str, dict[Waiter, float]] = {}
        # Each parked standby: its owner, and the number of its parking (a patience entry
        # of an earlier parking is stale).
        self._parked: dict[Waiter, tuple[str, int]] = {}
        # When each parked standby's patience runs out: (monotonic time, parking, standby).
        self._patience: list[tuple[float, int, Waiter]] = []
        self._parkings = itertools.count()
        # Each standby of a silent owner: that owner and this runner's rank for its loop.
        self._ranks: dict[Waiter, tuple[str, int]] = {}

    @property
    def quiet(self) -> int:
        """How many standbys wait quietly now."""
        return len(self._parked)

    def patience(self) -> float:
        """How long a quiet standby waits at most before it asks anyway."""
        return max(PATIENCE, len(self._parked) / QUIET_ASKS)

    def park(self, waiter: Waiter, owner: str, ttl: float) -> None:
        """``waiter`` stands by, quietly, for a lease of ``ttl`` seconds that ``owner`` holds;
        ``waiter.chance()`` is called when it should ask again (and must ``unpark`` it)."""
        self.unpark(waiter)
        parking = next(self._parkings)
        self._parked[waiter] = (owner, parking)
        self._waiting.setdefault(owner, {})[waiter] = ttl
        due = time.monotonic() + self.patience() * random.uniform(0.5, 1)
        heapq.heappush(self._patience, (due, parking, waiter))

    def unpark(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out of the quiet standbys; whether it was one."""
        found = self._parked.pop(waiter, None)
        if found is None:
            return False
        self._ranks.pop(waiter, None)
        owner = found[0]
        waiters = self._waiting.get(owner)
        if waiters is not None:
            waiters.pop(waiter, None)
            if not waiters:
                del self._waiting[owner]
        return True

    def _impatient(self, now: float) -> None:
        """Wake the parked standbys whose patience has run out."""
        patience = self._patience
        while patience and patience[0][0] <= now:
            _, parking, waiter = heapq.heappop(patience)
            found = self._parked.get(waiter)
            if found is not None and found[1] == parking:
                waiter.chance()
        if len(patience) > 2 * len(self._parked) + 1000:  # drop the entries of old parkings
            patience[:] = [entry for entry in patience if self._parked.get(entry[2], ("", -1))[1] == entry[1]]
            heapq.heapify(patience)

    def wake_all(self) -> None:
        """Every quiet standby asks again now (events may have been missed)."""
        for waiter in list(self._parked):
            waiter.chance()

    async def probe(self) -> None:
        """Find out, before any standby waits, whether the coordinator counts activity."""
        with contextlib.suppress(CoordinatorUnavailable):
            self.counted = await self.runner.coordinator.silence([]) is not None

    async def watch_forever(self) -> None:
        """Read the owners' activity counts and wake the standbys of silent ones."""
        while not self.runner.stopping:
            try:
                silence = await self.runner.coordinator.silence(list(self._waiting))
            except CoordinatorUnavailable:
                silence = {}  # nothing can be taken meanwhile; standbys keep waiting
            if silence is None:  # not counted here: nothing to watch, and standbys ask on their own
                self.counted = False
                self.wake_all()
                await self.runner.wait(60.0)
                continue
            self.counted = True
            self._impatient(time.monotonic())
            # Looked at again at the next regular look, or sooner when a silent owner's
            # standby comes due before it (not a look later).
            soonest = self.look_every
            for owner, silent in silence.items():
                if silent < self.shortest:
                    continue  # the common case: an active owner
                waiting = self._waiting.get(owner, {})
                ranked = len(waiting) > RANKED_FROM
                for waiter, ttl in list(waiting.items()):
                    over = silent - (ttl + drift_margin(ttl) + MATURE)
                    if over < 0:
                        soonest = min(soonest, -over)
                        continue
                    due = self._rank(waiter, owner) * min(RANK_STEP[0], RANK_STEP[1] * ttl) if ranked else 0.0
                    if over >= due:
                        waiter.silent_owner = owner
                        waiter.chance()
                    else:
                        soonest = min(soonest, due - over)
            await self.runner.wait(max(soonest, LOOK_EVERY[0] / 5))

    def _rank(self, waiter: Waiter, owner: str) -> int:
        """This runner's rank for ``waiter``'s loop among those that may take it from
        ``owner``, found once per parking."""
        found = self._ranks.get(waiter)
        if found is None or found[0] != owner:
            found = self._ranks[waiter] = (owner, self.runner.rank(waiter.key, waiter.family, owner))
        return found[1]
