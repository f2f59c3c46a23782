"""Standbys that wait quietly: a loop whose lease another runner holds does not ask for it
again while that runner is seen active.

A runner stands by for every loop it hosts that another runner holds: in a fleet of ten
runners sharing 10,000 loops, 9,000 of them. Asking for each every third of its TTL would
be thousands of requests a second for nothing. Instead a standby refused by an owner
waits here, and the runner reads the activity counts of the owners waited on
(``Coordinator.silence``) twice a second: every grant and every renewal moves its owner's
count. A standby wakes when

* an event says its lease may be free (``released``, ``resumed``, ``revoked``),
* its owner has been silent for the lease's TTL: its claims may then be taken (the
  coordinator checks that the count is still the one it saw), or
* the events connection came back after a loss (``missed``), or
* it has waited ``patience()``: an event lost otherwise costs at most that long.

On a coordinator that does not count activity (``silence`` answers ``None``) standbys ask
on their own, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

from ostinato.coordinators.clocks import drift_margin
from ostinato.coordinators.protocol import Coordinator
from ostinato.errors import CoordinatorUnavailable

log = logging.getLogger("ostinato.runner")

#: How often the activity counts of the owners standbys wait on are read: a tenth of the
#: shortest lease, within these bounds. A standby wakes within about two of these of the
#: moment its owner has been silent for the TTL.
LOOK_EVERY = (0.05, 0.5)
#: Past the TTL and its drift margin, how much longer an owner must be silent before its
#: standbys ask: the acquire must find the silence at least as long as the claim's TTL,
#: with no rounding (the TTL travels in milliseconds) to refuse it.
MATURE = 0.01
#: A quiet standby asks anyway after about this long, in case an event was lost without
#: its connection dropping (a connection that drops and comes back wakes every standby)...
PATIENCE = 60.0
#: ...or longer in a big fleet, so that a runner's quiet standbys ask at most this many
#: times a second in all.
QUIET_ASKS = 20.0


class Waiter(Protocol):
    """A keeper standing by, as this module sees it."""

    #: The owner whose silence woke it, if that is why it asks.
    silent_owner: str | None

    def chance(self) -> None: ...


class Watcher(Protocol):
    """The runner, as its standbys see it."""

    coordinator: Coordinator
    stopping: bool

    async def wait(self, seconds: float, *early: asyncio.Event) -> None: ...


class Standbys:
    """The quiet standbys of one runner, by the owner they wait on."""

    def __init__(self, runner: Watcher, shortest: float) -> None:
        self.runner = runner
        #: The shortest lease of the runner's loops.
        self.shortest = shortest
        self.look_every = min(max(shortest / 10, LOOK_EVERY[0]), LOOK_EVERY[1])
        #: Whether the coordinator counts its owners' activity (standbys may wait quietly).
        self.counted = False
        self._waiting: dict[str, dict[Waiter, float]] = {}
        self._count = 0

    @property
    def quiet(self) -> int:
        """How many standbys wait quietly now."""
        return self._count

    def patience(self) -> float:
        """How long a quiet standby waits at most before it asks anyway."""
        return max(PATIENCE, self._count / QUIET_ASKS)

    @contextlib.contextmanager
    def waiting(self, waiter: Waiter, owner: str, ttl: float) -> Iterator[None]:
        """``waiter`` stands by for a lease of ``ttl`` seconds that ``owner`` holds."""
        self._waiting.setdefault(owner, {})[waiter] = ttl
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            waiters = self._waiting.get(owner)
            if waiters is not None:
                waiters.pop(waiter, None)
                if not waiters:
                    del self._waiting[owner]

    def wake_all(self) -> None:
        """Every quiet standby asks again now (events may have been missed)."""
        for waiters in list(self._waiting.values()):
            for waiter in list(waiters):
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
            if silence is None:  # not counted here: nothing to watch
                self.counted = False
                await self.runner.wait(60.0)
                continue
            self.counted = True
            for owner, silent in silence.items():
                if silent < self.shortest:
                    continue  # the common case: an active owner
                for waiter, ttl in list(self._waiting.get(owner, {}).items()):
                    if silent >= ttl + drift_margin(ttl) + MATURE:
                        waiter.silent_owner = owner
                        waiter.chance()
            await self.runner.wait(self.look_every)
