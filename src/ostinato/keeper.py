"""One loop inside a runner: win its lease, run its passes while the lease holds, give it back.

This module keeps the lease: it asks the runner's ``Leases`` for it, stands by while
another runner holds it, and lets it go when the runner stops, the loop is paused, or
balance hands it to another runner. Running the passes meanwhile is ``ostinato.passes``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any

from ostinato.coordinators.protocol import Denied, Event, Grant
from ostinato.errors import CoordinatorUnavailable
from ostinato.host import Gate, Host
from ostinato.logs import fields
from ostinato.loop import REVOKED, LocalLease, LoopSpec, member_suffix
from ostinato.pacing import Slot
from ostinato.passes import PassDriver, Signal
from ostinato.stats import StatsBook

log = logging.getLogger("ostinato.loop")

#: A runner holding its fair share of loops waits this long (at most a tenth of
#: the loop's lease) before taking a free one, so that a runner with fewer loops
#: gets it first while a dead holder's loop still resumes within its lease.
YIELD_DELAY = 0.25
#: How long a runner whose lease was revoked or taken waits before asking again.
STEP_ASIDE = 0.5
#: A loop handed over for balance that nobody else took is not handed over
#: again for this long (the other runners cannot or will not run it).
BALANCE_COOLDOWN = 60.0


class LoopKeeper(PassDriver):
    """Keeps one loop going in one runner for as long as the runner lives."""

    def __init__(
        self, runner: Host, spec: LoopSpec, *, partition: int | None = None,
        key: str | None = None, gate: Gate | None = None,
    ) -> None:
        self.runner = runner
        self.spec = spec
        #: A member's partition (``partitions=``) or key (``keys=``).
        self.partition = partition
        self.member_key = key
        #: Asked before and after taking the lease, for a partition.
        self.gate = gate
        #: Set when a key leaves the list: finish the pass, let the lease go, end.
        self.retired = False
        #: The loop as declared (``app:loop``), of which this is a partition or key, if one.
        self.family = f"{runner.app_name}:{spec.name}"
        self.key = f"{self.family}{member_suffix(partition, key)}"
        self.stats = StatsBook(self.key, spec.stall_after, spec.fail_after)
        self.lease: LocalLease | None = None
        self.held_at = 0.0
        self.paused = False
        self.stalled = False
        self.stall_began = 0.0
        self.failing = False
        self.failing_since = 0.0
        self.overrun_logged_at: float | None = None
        # Set by an event that makes another try at the lease worthwhile.
        self._chance = Signal()
        # Wakes the pass driver: a wake-up, a lost lease, or the runner stopping (a pass
        # driver in a thread waits on the first; only loops run in threads need one).
        self._signal = threading.Event() if not spec.is_async or spec.isolated else None
        self._woken = False
        self._async_signal: Signal | None = None
        self._outage_logged = False
        self._failures = 0
        self._handing_over = False
        self._async_pass: asyncio.Task[Any] | None = None
        self._cancelled_for_lease: bool = False
        self._step_aside = False
        # The calendar slot the next pass stands for (cron= loops).
        self._due: Slot | None = None
        # Set when the runner gives up waiting for a pass: an isolated one is killed.
        self._abort = [False]
        self._handed_over_fence: int | None = None
        self._just_handed_over = False
        #: The owner whose silence woke this standby (``ostinato.standbys``).
        self.silent_owner: str | None = None
        self.balance_cooldown_until = 0.0
        #: Leases won and lost by this runner, for metrics.
        self.acquisitions = 0
        self.losses = 0

    # -- notices from the runner ----------------------------------------------

    def wake(self) -> None:
        """End the idle wait now."""
        self._woken = True
        self.nudge()

    def nudge(self) -> None:
        """Make the pass driver look at its lease and the stop flag again."""
        if self._signal is not None:
            self._signal.set()
        if self._async_signal is not None:
            self._async_signal.set()

    def chance(self) -> None:
        """The lease may be free: try for it now instead of at the next retry."""
        if self.runner.standbys.unpark(self):
            self.runner.resume(self)
        elif not self.runner.hurry(self.key):
            self._chance.set()

    def lose(self, why: str, *, step_aside: bool = False) -> None:
        """Stop starting passes at once: a renewal failed or said the lease is gone.

        ``step_aside``: the lease was taken or revoked, so let another runner have
        the first go at it rather than asking for it back at once.
        """
        lease = self.lease
        if lease is None or lease.deadline == REVOKED:
            return
        self._step_aside = self._step_aside or step_aside
        lease.revoke()
        self.runner.lease_ended(self.key, lease)
        self.losses += 1
        log.warning("%s: lease lost (fence %d): %s", self.key, lease.fence, why,
                    extra=self._fields("lease_lost", lease.fence))
        self._stop_async_pass()

    def suspend(self) -> None:
        """The lease is kept, but the coordinator's session holding it went unheard: stop the
        pass in flight if it can be stopped (a standby may take the lease if the session
        ended). New passes wait by themselves (``LocalLease.suspended``)."""
        lease = self.lease
        if lease is None or lease.deadline == REVOKED:
            return
        # The coordinator says so once for all its loops; a loop speaks only of a pass it
        # stops (thousands of idle loops would otherwise each log the same line).
        if self.stats.running_since is not None:
            log.warning("%s: passes wait (fence %d), the one in flight stopped if it can be: the "
                        "coordinator's session holding the lease went unheard", self.key, lease.fence,
                        extra=self._fields("lease_suspended", lease.fence))
        self._stop_async_pass()

    def _stop_async_pass(self) -> None:
        """Cancel the async pass in flight, if any (a runner taking over must not overlap
        it), and make the pass driver look at its lease again."""
        if self._async_pass is not None:
            self._cancelled_for_lease = True
            self._async_pass.cancel()
        self.nudge()

    def _fields(self, event: str, fence: int | None = None) -> dict[str, object]:
        return fields(event, loop=self.key, fence=fence, runner=self.runner.info.label)

    def abort(self) -> None:
        """The runner will not wait any longer: end the current pass if it can be ended."""
        self._abort[0] = True
        self.nudge()

    def hand_over(self) -> None:
        """Finish the current pass, then release the lease so a less busy runner takes it."""
        if self.lease is not None and not self._handing_over:
            self._handing_over = True
            log.info("%s: handing over to balance the loops across runners", self.key,
                     extra=self._fields("hand_over"))
            self.nudge()

    def retire(self) -> None:
        """The member's key left the list: finish the current pass, let the lease go, end."""
        if not self.retired:
            self.retired = True
            self.nudge()
            self.chance()

    def _leaving(self) -> bool:
        """Whether the pass driver must stop starting passes and let the lease go."""
        return self._handing_over or self.retired or (self.gate is not None and not self.gate.open)

    def on_event(self, event: Event) -> None:
        if event.kind == "wake":
            self.wake()
        elif event.kind in ("released", "resumed", "revoked"):
            self.chance()

    # -- the lease ------------------------------------------------------------

    async def keep(self, answer: Grant | Denied | None = None, *, wait_out: Denied | None = None) -> None:
        """Acquire, hold, release, again, until the runner stops. The runner may have asked
        for the lease already, with no task for this keeper: ``answer`` is what it was told,
        or ``wait_out`` a refusal to stand by on before asking again."""
        runner = self.runner
        if wait_out is not None:
            await self._wait_out(wait_out)
        sent = 0.0  # a grant the runner asked for carries when its request left
        while True:
            if answer is None:
                if runner.stopping or self.retired:
                    return
                if self.gate is not None and not self.gate.open:
                    await self.gate.wait_open()
                    continue
                if not await self._before_asking():
                    return
                sent = time.monotonic()
                answer = await self._ask()
                if answer is None:
                    continue
            got, answer = answer, None
            if isinstance(got, Denied):
                if self.parks(got):
                    return  # no task while parked: ``chance`` starts it again
                await self._wait_out(got)
                continue
            if self.gate is not None and not await self._gate_confirms(got):
                continue
            await self._hold(got, sent)

    async def _before_asking(self) -> bool:
        """Wait as the last lease's end and the balance of loops require; False if the
        runner stopped meanwhile."""
        if self._step_aside:
            self._step_aside = False
            await self._wait_chance(STEP_ASIDE, chances=False)
        if self._just_handed_over:
            # Handed over for balance: the runner it went to has a third of the lease to
            # take it, however busy, before this one asks again (once: from then on it
            # stands by like any other).
            self._just_handed_over = False
            await self._wait_chance(self.spec.lease / 3, chances=False)
        elif (delay := self.yield_delay()) > 0:
            await self._wait_chance(delay, chances=False)
        return not self.runner.stopping

    def yield_delay(self, *, released: bool = False) -> float:
        """How long this runner waits before asking for a lease that may be free, so that a
        runner with fewer loops gets it first: none below its fair share, a moment at or
        above it (a dead holder's loop still resumes within its lease). A lease its holder
        ``released`` (handed over for balance) waits as long as after handing one over
        when this runner is above its share: a runner joining the fleet takes the loops
        handed to it, rather than the others passing them among themselves."""
        share = self.runner.share_held()
        if share < 0:
            return 0.0
        if share > 0 and released:
            return self.spec.lease / 3
        return min(YIELD_DELAY, self.spec.lease / 10) * random.uniform(0.8, 1.2)

    async def _ask(self) -> Grant | Denied | None:
        """Ask for the lease; None (after a wait) if the coordinator cannot be reached."""
        try:
            answer = await self.runner.acquire(self.key, self.spec.lease)
        except CoordinatorUnavailable as exc:
            self._failures += 1
            if not self._outage_logged:
                log.error("%s: cannot reach the coordinator, retrying: %s", self.key, exc,
                          extra=self._fields("coordinator_unreachable"))
                self._outage_logged = True
            await self._wait_chance(min(5.0, 0.1 * 2 ** min(self._failures, 6)) * random.uniform(0.5, 1))
            return None
        if self._outage_logged:
            log.warning("%s: coordinator reachable again", self.key,
                        extra=self._fields("coordinator_reachable"))
            self._outage_logged = False
        self._failures = 0
        return answer

    async def _gate_confirms(self, grant: Grant) -> bool:
        """Whether the partition count in force is still this runner's, read after the grant
        arrived; if not, the lease goes back unused."""
        assert self.gate is not None
        try:
            if await self.gate.confirm(time.monotonic()):
                return True
        except CoordinatorUnavailable:
            pass
        lease = LocalLease(grant.fence, self.spec.lease, time.monotonic())
        await self.runner.give_back(self.key, lease)
        return False

    def parks(self, denied: Denied) -> bool:
        """Take in a refusal; if its owner is active, park as a quiet standby (no task: it waits
        for an event, for the owner to fall silent, or for the standbys' patience to run
        out, and ``chance`` starts it again). Whether it was parked."""
        if denied.paused != self.paused:
            self.paused = denied.paused
            state = "paused" if denied.paused else "resumed"
            log.info("%s: %s", self.key, state, extra=self._fields(state))
        woken_by, self.silent_owner = self.silent_owner, None
        standbys = self.runner.standbys
        if denied.owner is not None and standbys.counted and denied.owner != woken_by:
            standbys.park(self, denied.owner, self.spec.lease)
            return True
        return False

    async def _wait_out(self, denied: Denied) -> None:
        """Wait until a lease refused, not parked on, is worth asking for again: when the
        holder's claim runs out, and at least every third of a TTL."""
        wait = self.spec.lease / 3
        if denied.expires_in is not None:
            wait = min(wait, max(denied.expires_in, 0.0) + 0.002)
        await self._wait_chance(wait * (1 if denied.expires_in is not None else random.uniform(0.8, 1)))

    async def _wait_chance(self, seconds: float, *, chances: bool = True) -> None:
        self._chance.clear()
        waiter = asyncio.ensure_future(self._chance.wait() if chances else asyncio.sleep(seconds))
        stopper = asyncio.ensure_future(self.runner.stopped.wait())
        try:
            await asyncio.wait({waiter, stopper}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopper.cancel()

    async def _hold(self, grant: Grant, sent: float) -> None:
        lease = LocalLease(grant.fence, self.spec.lease, max(sent, grant.sent or sent), grant.bound)
        if self.paused:
            self.paused = False
        self.lease = lease
        self.runner.lease_granted(self.key, lease)
        self.held_at = time.monotonic()
        self.acquisitions += 1
        log.info("%s: lease acquired (fence %d)", self.key, lease.fence,
                 extra=self._fields("lease_acquired", lease.fence))
        if self._handed_over_fence is not None and grant.fence == self._handed_over_fence + 1:
            self.balance_cooldown_until = self.held_at + BALANCE_COOLDOWN
        self._handed_over_fence = None
        now, wall_now = time.monotonic(), time.time()
        first, self._due = self.spec.pacing.first(
            now=now, wall_now=wall_now, last_start_wall=grant.last_start, seed=self.key
        )
        self._show_next(first - now + wall_now)
        finished = True
        try:
            if self.spec.is_async and not self.spec.isolated:
                await self._run_async(lease, first)
            else:
                finished = await self._run_thread(lease, first)
        finally:
            self.lease = None
            self.runner.lease_ended(self.key, lease)
            if (
                lease.deadline != REVOKED and not self.runner.stopping
                and not self._handing_over and not lease.holds()
            ):
                # No renewal answered in time: say so, as lose() would have.
                self.losses += 1
                log.warning("%s: lease lost (fence %d): it ran out before a renewal answered",
                            self.key, lease.fence, extra=self._fields("lease_lost", lease.fence))
            if finished and lease.deadline != REVOKED:
                await self._record_start()
                await self.runner.give_back(self.key, lease)
            if self._handing_over:
                self._handing_over = False
                self._handed_over_fence = lease.fence
                self._just_handed_over = True

