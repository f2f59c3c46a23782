"""A runner: one process hosting many loops, each under its own lease.

Besides a ``LoopKeeper`` per loop, a runner has three side tasks: the renewer
(extends every held lease about every third of its TTL, in one call), the
reporter (sends batched statistics and the runner's heartbeat every second)
and the watchdog (logs passes over their timeout and loops that stall). A
side task that dies is logged and started again: it never ends the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import inspect
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ostinato.coordinators.protocol import Coordinator, Denied, Event, Grant, Renewal, RunnerInfo
from ostinato.errors import ConfigurationError, CoordinatorUnavailable
from ostinato.families import KeySet, PartitionGuard
from ostinato.host import FAREWELL as FAREWELL
from ostinato.host import RUNNER_TTL as RUNNER_TTL
from ostinato.keeper import LoopKeeper
from ostinato.logs import fields
from ostinato.loop import REVOKED, LocalLease, LoopSpec
from ostinato.notices import Stall as Stall
from ostinato.notices import StallHook as StallHook
from ostinato.stats import StatsBook, wall_offset

log = logging.getLogger("ostinato.runner")

#: The most lease requests sent in one call.
ACQUIRE_BATCH = 1000
#: How often statistics and the heartbeat are sent.
REPORT_EVERY = 1.0
#: The watchdog looks at every loop (not only those with a timeout or stall_after) once in
#: this many rounds.
SWEEP_EVERY = 10
#: From this many loops, a runner that owns its process keeps the objects of its start out
#: of the garbage collector's rounds (``gc.freeze``, which acts on the whole process), once
#: every loop is held or after ``SETTLE_WITHIN``.
FREEZE_FROM = 1000
SETTLE_WITHIN = 60.0
#: How often the leases held are counted again for ``at_fair_share``.
RECOUNT_EVERY = 0.25




class Runner:
    """Hosts ``specs`` of the app ``app_name`` against ``coordinator`` until stopped."""

    def __init__(
        self,
        app_name: str,
        specs: Sequence[LoopSpec],
        coordinator: Coordinator,
        *,
        grace: float = 30.0,
        stall_hooks: Sequence[StallHook] = (),
        app_target: str | None = None,
        freeze_gc: bool = False,
    ) -> None:
        self.app_name = app_name
        #: The runner owns its process (``ostinato run``, ``app.run()``): from ``FREEZE_FROM``
        #: loops it keeps the objects of its start out of the collector's rounds.
        self.freeze_gc = freeze_gc
        self.coordinator = coordinator
        self.grace = grace
        self._declared = tuple(f"{app_name}:{spec.name}" for spec in specs)
        self.info = RunnerInfo.here(hosts=self._declared)
        self.started_wall = time.time()
        self.stopping = False
        self.stopped = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.wall_offset = wall_offset()
        #: The ids of the live runners, from the last count (for partition count changes).
        self.live_ids: set[str] = set()
        self.keepers: dict[str, LoopKeeper] = {}
        #: What each loop made of members agrees on (``partitions=``, ``keys=``), by loop.
        self.guards: dict[str, PartitionGuard] = {}
        self.key_sets: dict[str, KeySet] = {}
        self._keeper_tasks: dict[str, asyncio.Task[None]] = {}
        #: The statistics with something new to report.
        self._changed: set[StatsBook] = set()
        #: The loops the watchdog looks at on every round (``None``: to be listed again).
        self._watched: list[LoopKeeper] | None = None
        self._renew_now = asyncio.Event()
        self._granted = asyncio.Event()
        #: When the renewer's next round is due (monotonic).
        self._due = float("inf")
        #: Lease requests waiting for the next batch: key -> (ttl, answer).
        self._wanted: dict[str, tuple[float, asyncio.Future[Grant | Denied]]] = {}
        self._asking: asyncio.Future[None] | None = None
        self.live_runners = 1
        #: Live runners (this one included) that can run each loop, from the last count.
        self._candidates: dict[str, int] = {}
        # The earliest a lease kept by the last renewal falls due again.
        self._earliest_due = math.inf
        #: Calls to the coordinator by kind (acquire: one batch of requests), and leases
        #: renewed, since start (metrics).
        self.calls: Counter[str] = Counter()
        self.renewals = 0
        # Leases held and the fair share, as last counted (``at_fair_share``).
        self._held_count = self._share = 0
        self._recount_at = 0.0
        #: How child processes import the app (``isolation="process"``).
        self.app_target = app_target
        self.stall_hooks = list(stall_hooks)
        self._hook_tasks: set[asyncio.Future[object]] = set()
        self._shortest_lease = min((spec.lease for spec in specs), default=10.0)
        #: Set once the coordinator answered and the loops started.
        self.connected = asyncio.Event()
        #: Why the runner gave up before its loops started (a wrong setting), if it did.
        self.error: BaseException | None = None
        #: Set once ``run`` has returned, for whatever reason.
        self.ended = asyncio.Event()
        for spec in specs:
            self._host(spec)
        self.hosts_changed()

    def _host(self, spec: LoopSpec) -> None:
        family = f"{self.app_name}:{spec.name}"
        if spec.partitions is not None:
            guard = self.guards[family] = PartitionGuard(self, spec)
            for i in range(spec.partitions):
                keeper = LoopKeeper(self, spec, partition=i, gate=guard)
                guard.keepers.append(keeper)
                self.add_keeper(keeper)
        elif spec.keys is not None:
            key_set = self.key_sets[family] = KeySet(self, spec)
            self.add_keeper(LoopKeeper(self, key_set.refresher()))
        else:
            self.add_keeper(LoopKeeper(self, spec))

    def hosts_changed(self) -> None:
        """Tell balancing which loops this runner can run now: not the partitions of a loop
        whose count in force is not the one it declares."""
        closed = {family for family, guard in self.guards.items() if not guard.open}
        hosts = tuple(key for key in self._declared if key not in closed)
        self.info = dataclasses.replace(self.info, hosts=hosts)

    def new_member(self, spec: LoopSpec, key: str) -> LoopKeeper:
        """Host the member of ``keys=`` loop ``spec`` for ``key``."""
        keeper = LoopKeeper(self, spec, key=key)
        self.add_keeper(keeper)
        return keeper

    def add_keeper(self, keeper: LoopKeeper) -> None:
        """Host one more loop (a key's member); started at once if the runner runs."""
        keeper.stats.on_failing = self._failing_changed(keeper)
        keeper.stats.changed = self._changed
        self._changed.add(keeper.stats)
        self.keepers[keeper.key] = keeper
        self._watched = None
        if self.connected.is_set() and not self.stopping:
            self._start_keeper(keeper)

    def _start_keeper(self, keeper: LoopKeeper) -> None:
        task = asyncio.create_task(keeper.keep(), name=keeper.key)
        self._keeper_tasks[keeper.key] = task
        task.add_done_callback(lambda _: self._keeper_ended(keeper))

    def _keeper_ended(self, keeper: LoopKeeper) -> None:
        if keeper.retired and self.keepers.get(keeper.key) is keeper:
            del self.keepers[keeper.key]
            self._watched = None
            self._keeper_tasks.pop(keeper.key, None)

    # -- life cycle ----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run every loop until ``stop`` is set, then stop gracefully.

        The coordinator is opened here, retried with backoff while it cannot be reached;
        ``stop`` ends the wait at once. A wrong setting (``ConfigurationError``) ends the
        runner: it is logged and kept in ``error``.
        """
        try:
            await self._run(stop)
        finally:
            self.ended.set()

    async def _run(self, stop: asyncio.Event) -> None:
        try:
            if not await self._until(stop, self._connect()):
                return
        except ConfigurationError as exc:
            self.error = exc
            log.error("cannot host the loops of %r: %s", self.app_name, exc,
                      extra=fields("runner_failed", runner=self.info.label))
            return
        self.connected.set()
        log.info(
            "runner %s started: %d loop(s) of %r on %s",
            self.info.label, len(self.keepers), self.app_name, self.coordinator.display_url,
            extra=fields("runner_started", runner=self.info.label),
        )
        if not await self._until(stop, self._subscribe()):
            return
        for keeper in list(self.keepers.values()):
            self._start_keeper(keeper)
        jobs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("renewer", self._renew_forever),
            ("reporter", self._report_forever),
            ("watchdog", self._watch_forever),
        ]
        jobs += [(f"partitions {family}", guard.watch) for family, guard in self.guards.items()]
        jobs += [(f"keys {family}", keys.watch) for family, keys in self.key_sets.items()]
        sides = [asyncio.create_task(self._supervise(name, job), name=name) for name, job in jobs]
        await stop.wait()
        await self._stop(sides)

    async def _until(self, stop: asyncio.Event, step: Coroutine[Any, Any, None]) -> bool:
        """Run ``step``; if ``stop`` is set first, cancel it and return False."""
        task = asyncio.ensure_future(step)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
        task.result()
        return True

    async def _connect(self) -> None:
        """Open the coordinator, retrying with backoff while it cannot be reached."""
        delay = 0.1
        while True:
            try:
                await self.coordinator.open()
                return
            except CoordinatorUnavailable as exc:
                log.error("coordinator %s unreachable, retrying in %.1fs: %s",
                          self.coordinator.display_url, delay, exc,
                          extra=fields("coordinator_unreachable", runner=self.info.label))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _subscribe(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.coordinator.subscribe(self.info, self._on_event)
                return
            except CoordinatorUnavailable as exc:
                log.error("cannot subscribe to events yet, retrying in %.1fs: %s", delay, exc,
                          extra=fields("coordinator_unreachable", runner=self.info.label))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _stop(self, sides: list[asyncio.Task[None]]) -> None:
        log.info("runner %s stopping: finishing current passes (grace %ss)", self.info.label, self.grace,
                 extra=fields("runner_stopping", runner=self.info.label))
        self.stopping = True
        self.stopped.set()
        for keeper in self.keepers.values():
            keeper.nudge()
        keepers = list(self._keeper_tasks.values())
        _, late = await asyncio.wait(keepers, timeout=self.grace) if keepers else (set(), set())
        for task in late:
            log.error("%s: pass still running after the grace period; cancelling it", task.get_name(),
                      extra=fields("grace_exceeded", loop=task.get_name(), runner=self.info.label))
            self.keepers[task.get_name()].abort()
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=5.0)
        for task in sides:
            task.cancel()
        await asyncio.gather(*sides, return_exceptions=True)
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(self._report(), FAREWELL / 2)
        log.info("runner %s stopped", self.info.label,
                 extra=fields("runner_stopped", runner=self.info.label))

    async def give_back(self, key: str, lease: LocalLease) -> None:
        """Release a lease this runner no longer needs and tell standbys at once."""
        try:
            async with asyncio.timeout(FAREWELL if self.stopping else None):
                self.calls["release"] += 1
                released = await self.coordinator.release(key, self.info, lease.fence)
                if released:
                    await self.coordinator.publish(Event("released", key))
            if released:
                log.info("%s: lease released (fence %d)", key, lease.fence,
                         extra=fields("lease_released", loop=key, fence=lease.fence,
                                      runner=self.info.label))
        except (CoordinatorUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {FAREWELL}s"
            log.warning("%s: could not release the lease, it will expire: %s", key, why,
                        extra=fields("release_failed", loop=key, fence=lease.fence,
                                     runner=self.info.label))

    def _on_event(self, event: Event) -> None:
        if event.kind == "changed":
            family = self.guards.get(event.key) or self.key_sets.get(event.key)
            if family is not None:
                family.on_changed()
            return
        keeper = self.keepers.get(event.key)
        if keeper is None:
            return
        if event.kind == "revoked" and keeper.lease is not None:
            keeper.lose("the lease was revoked", step_aside=True)  # the renewal confirms it
        if event.kind == "unconfirmed":
            keeper.suspend()
        if event.kind == "dropped" and keeper.lease is not None:
            keeper.lose("the connection to the coordinator dropped; asking for it again")
        if event.kind in ("paused", "revoked"):
            self._renew_now.set()  # a holder learns at once, from its renewal
        keeper.on_event(event)

    async def _supervise(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        while not self.stopping:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("runner task %s failed; starting it again", name,
                              extra=fields("runner_task_failed", runner=self.info.label))
                await asyncio.sleep(1.0)

    async def wait(self, seconds: float, *early: asyncio.Event) -> None:
        """Sleep ``seconds``, less if the runner stops or an ``early`` event is set."""
        await self._sleep(seconds, *early)

    async def _sleep(self, seconds: float, *early: asyncio.Event) -> None:
        events = [self.stopped, *early]
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # -- acquiring ---------------------------------------------------------------------

    async def acquire(self, key: str, ttl: float) -> Grant | Denied:
        """Ask for the lease of ``key``: requests that arrive while a batch is out are sent
        together in the next one (one call, on SQLite one transaction), so thousands of
        loops starting at once cost a few round trips, not thousands."""
        future: asyncio.Future[Grant | Denied] = self.loop.create_future()
        self._wanted[key] = (ttl, future)
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self._ask_in_batches())
        return await future

    async def _ask_in_batches(self) -> None:
        await asyncio.sleep(0)  # the requests of this turn of the event loop go together
        while self._wanted:
            batch = dict(itertools.islice(self._wanted.items(), ACQUIRE_BATCH))
            for key in batch:
                del self._wanted[key]
            sent = time.monotonic()
            try:
                self.calls["acquire"] += 1
                answers = await self.coordinator.acquire_many(
                    self.info, {key: ttl for key, (ttl, _) in batch.items()}
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

    # -- renewing ------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        began, frozen = time.monotonic(), not self.freeze_gc or len(self.keepers) < FREEZE_FROM
        while not self.stopping:
            self._renew_now.clear()
            started = time.monotonic()
            held = await self.renew_once()
            if not frozen and (held >= len(self.keepers) or started - began > SETTLE_WITHIN):
                # The keepers and the leases they hold now live as long as the runner: the
                # collector need not look at them again (at 10,000 loops its full rounds
                # over them took a third of the runner's CPU).
                gc.freeze()
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
        while not self.stopping and not self._renew_now.is_set():
            self._granted.clear()
            wait = max(self._due, floor) - time.monotonic()
            if wait <= 0:
                return
            await self._sleep(wait, self._renew_now, self._granted)

    def lease_granted(self, lease: LocalLease) -> None:
        """A keeper got ``lease``: the renewer wakes if it falls due before its next turn."""
        self._earliest_due = min(self._earliest_due, lease.renew_at)
        self._held_count += 1
        if lease.renew_at < self._due:
            self._due = lease.renew_at
            self._granted.set()

    def _held_leases(self) -> dict[str, tuple[LoopKeeper, LocalLease]]:
        return {
            key: (keeper, keeper.lease)
            for key, keeper in self.keepers.items()
            if keeper.lease is not None and keeper.lease.deadline != REVOKED
        }

    async def renew_once(self) -> int:
        """Extend every lease held here; a lease whose renewal fails stops its passes at once.
        Returns how many were kept."""
        self._earliest_due = math.inf
        held = self._held_leases()
        if not held:
            return 0
        request = {key: (lease.fence, lease.ttl) for key, (_, lease) in held.items()}
        # The call must not outlive the latest lease: past that, every answer is moot. A
        # lease that runs out sooner stops its own passes meanwhile; cutting the call
        # short for it would cost the others their renewal (on PostgreSQL, their locks).
        latest = max(lease.deadline for _, lease in held.values())
        sent = time.monotonic()
        self.calls["renew"] += 1
        try:
            answers = await asyncio.wait_for(
                self.coordinator.renew(self.info, request), timeout=max(latest - sent, 0.001)
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

    # -- spreading loops across runners -------------------------------------------------

    def held(self) -> list[LoopKeeper]:
        return [k for k in self.keepers.values() if k.lease is not None and k.lease.valid()]

    def fair_share(self) -> int:
        """The most loops this runner takes while others are alive: its share of each loop,
        split evenly among the live runners that can run it, summed and rounded up."""
        share = sum(1 / self._candidates.get(key, 1) for key in self.keepers)
        return max(1, -(-round(share * 1000) // 1000))

    def at_fair_share(self) -> bool:
        """Whether this runner holds its fair share already. Every standby asks before each
        try, so the count is made at most every ``RECOUNT_EVERY`` (grants meanwhile add to
        it at once), not on every ask: with thousands of standbys that was quadratic."""
        if self.live_runners <= 1:
            return False
        now = time.monotonic()
        if now >= self._recount_at:
            self._held_count, self._share = len(self.held()), self.fair_share()
            self._recount_at = now + RECOUNT_EVERY
        return self._held_count >= self._share

    async def balance(self) -> None:
        """Count the live runners that can run each loop, and hand over loops held beyond the
        fair share, one at a time. Runners of other apps, or that do not host a loop
        (``--only``), do not count for it."""
        self.calls["runners"] += 1
        runners = await self.coordinator.runners()
        self.live_ids = {record.id for record in runners}
        candidates: dict[str, int] = {}  # the other runners that can run each loop
        others = 0
        for record in runners:
            if record.id == self.info.id:
                continue
            shares = [key for key in self.keepers if record.can_run(key)]
            others += bool(shares)
            for key in shares:
                candidates[key] = candidates.get(key, 0) + 1
        # Alone, nothing to count: every loop falls to this runner (``get(key, 1)``).
        self._candidates = {key: count + 1 for key, count in candidates.items()}
        self.live_runners = 1 + others
        self._recount_at = 0.0  # the share may have changed
        if self.live_runners <= 1:
            return
        held = self.held()
        if len(held) <= self.fair_share():
            return
        now = time.monotonic()
        movable = [
            k for k in held if k.balance_cooldown_until <= now and self._candidates.get(k.key, 1) > 1
        ]
        if movable:
            # The one that most recently finished a pass is least likely to be mid-pass.
            movable.sort(key=lambda k: (k.stats.running_since is not None, -(k.stats.last_end or 0)))
            movable[0].hand_over()

    # -- reporting ----------------------------------------------------------------------

    async def _report_forever(self) -> None:
        failing = False
        while not self.stopping:
            try:
                await self._report()
            except CoordinatorUnavailable as exc:
                if not failing:
                    log.error("cannot report to the coordinator, will retry: %s", exc,
                              extra=fields("report_failed", runner=self.info.label))
                failing = True
            else:
                if failing:
                    log.warning("reporting to the coordinator again",
                                extra=fields("report_resumed", runner=self.info.label))
                failing = False
            await self._sleep(REPORT_EVERY)

    async def _report(self) -> None:
        self.wall_offset = offset = wall_offset()
        books = []
        with contextlib.suppress(KeyError):
            while True:  # one pop at a time: a pass's thread may add a book meanwhile
                books.append(self._changed.pop())
        batch = [(book, stats) for book in books if (stats := book.pending(offset)) is not None]
        try:
            self.calls["report"] += 1
            await self.coordinator.report(self.info, RUNNER_TTL, [stats for _, stats in batch])
        except BaseException:
            self._changed.update(books)  # sent with the next report
            raise
        for book, stats in batch:
            book.sent(stats)
            if book.running_since is not None:
                self._changed.add(book)  # a pass in flight is reported every time
        if not self.stopping:
            await self.balance()

    # -- watching for overruns and stalls --------------------------------------------------

    async def _watch_forever(self) -> None:
        limits = [
            s for k in self.keepers.values() for s in (k.spec.timeout, k.spec.stall_after) if s
        ]
        interval = min(1.0, max(0.05, min(limits) / 4)) if limits else 1.0
        rounds = 0
        while not self.stopping:
            self.check_passes(time.monotonic(), everything=rounds % SWEEP_EVERY == 0)
            rounds += 1
            await self._sleep(interval)

    def check_passes(self, now: float, *, everything: bool = True) -> None:
        """Log passes over their timeout (every timeout again) and stalls as they start and end.

        A loop's statistics tell the runner at once when it starts or stops failing; the
        watchdog looks at every loop only on ``everything`` rounds, as a backstop, and at
        loops with a ``timeout`` or ``stall_after`` on each round."""
        if everything or self._watched is None:
            self._watched = [k for k in self.keepers.values()
                             if k.spec.timeout is not None or k.spec.stall_after is not None]
        for keeper in self.keepers.values() if everything else self._watched:
            spec, stats = keeper.spec, keeper.stats
            running = stats.running_since
            in_thread = not spec.is_async and not spec.isolated  # the others are cancelled or killed
            if (
                in_thread and spec.timeout is not None and running is not None
                and now - running > spec.timeout
            ):
                last = keeper.overrun_logged_at
                if last is None or last < running or now - last >= spec.timeout:
                    keeper.overrun_logged_at = now
                    log.error(
                        "%s: pass has run for %.1fs, over its timeout of %ss; a sync pass cannot "
                        "be interrupted, so the lease is kept until it returns",
                        keeper.key, now - running, spec.timeout,
                        extra=fields("pass_overran", loop=keeper.key,
                                     fence=None if keeper.lease is None else keeper.lease.fence,
                                     runner=self.info.label),
                    )
            if keeper.lease is None:
                continue
            self._check_failing(keeper, now)
            if spec.stall_after is not None:
                self._check_stall(keeper, now, spec.stall_after)

    def _check_stall(self, keeper: LoopKeeper, now: float, stall_after: float) -> None:
        """A stall begins when no pass has finished for ``stall_after``, and ends only when a
        pass finishes without failing: a pass that fails at its timeout ends no stall, so
        such a loop does not flap between stalled and recovered (it reads as failing)."""
        stats, lease = keeper.stats, keeper.lease
        assert lease is not None
        since = max(stats.last_end or 0.0, keeper.held_at)
        if keeper.stalled:
            stalled = not (stats.last_ok_end is not None and stats.last_ok_end > keeper.stall_began
                           and now - stats.last_ok_end <= stall_after)
        else:
            stalled = now - since > stall_after
        if stalled == keeper.stalled:
            return
        keeper.stalled = stalled
        notice, extra = self._notice(
            keeper, "stalled", stalled_for=now - (keeper.stall_began if not stalled else since),
            recovered=not stalled,
        )
        if stalled:
            keeper.stall_began = since
            log.error("%s: stalled: no pass finished for %.1fs", keeper.key, now - since,
                      extra=extra)
        else:
            log.warning("%s: recovered from a stall of %.1fs", keeper.key, notice.stalled_for,
                        extra=extra)
        self._call_hooks(notice)

    def _notice(
        self, keeper: LoopKeeper, reason: str, *, stalled_for: float, recovered: bool,
        failed_passes: int = 0, last_error: str | None = None,
    ) -> tuple[Stall, dict[str, object]]:
        """The notice of a loop held here going into trouble or out of it, and its log fields."""
        lease, last_end = keeper.lease, keeper.stats.last_end
        assert lease is not None
        notice = Stall(
            loop=keeper.key, holder=self.info.label, fence=lease.fence,
            last_pass_end=None if last_end is None else last_end + self.wall_offset,
            stalled_for=stalled_for, recovered=recovered, reason=reason,
            failed_passes=failed_passes, last_error=last_error,
        )
        extra = fields("recovered" if recovered else reason, loop=keeper.key, fence=lease.fence,
                       runner=self.info.label)
        return notice, extra

    def _failing_changed(self, keeper: LoopKeeper) -> Callable[[], object]:
        """What a loop's statistics call when failing may have started or ended: a look at
        it on the event loop at once, not at the watchdog's next round."""

        def look() -> None:
            if keeper.lease is not None and not self.stopping:
                self._check_failing(keeper, time.monotonic())

        return lambda: self.loop.call_soon_threadsafe(look)

    def _check_failing(self, keeper: LoopKeeper, now: float) -> None:
        """``failing`` begins when the last ``fail_after`` passes all failed, and ends when a
        pass does not fail."""
        stats, lease, spec = keeper.stats, keeper.lease, keeper.spec
        assert lease is not None
        failing = stats.fail_streak >= spec.fail_after
        if failing == keeper.failing:
            return
        keeper.failing = failing
        if failing:
            keeper.failing_since = now
        notice, extra = self._notice(
            keeper, "failing", stalled_for=now - keeper.failing_since, recovered=not failing,
            failed_passes=stats.fail_streak, last_error=stats.last_error,
        )
        if failing:
            log.error("%s: failing: the last %d passes all failed; the last error: %s", keeper.key,
                      stats.fail_streak, stats.last_error, extra=extra)
        else:
            log.warning("%s: recovered: a pass succeeded after %.1fs of failing", keeper.key,
                        notice.stalled_for, extra=extra)
        self._call_hooks(notice)

    def _call_hooks(self, notice: Stall) -> None:
        """Run each stall hook off the event loop (a slow webhook must not delay leases)."""
        loop = asyncio.get_running_loop()
        for hook in self.stall_hooks:
            future: asyncio.Future[object]
            if inspect.iscoroutinefunction(hook):
                future = asyncio.ensure_future(hook(notice))
            else:
                future = loop.run_in_executor(None, hook, notice)
            self._hook_tasks.add(future)
            future.add_done_callback(self._hook_done)

    def _hook_done(self, future: asyncio.Future[object]) -> None:
        self._hook_tasks.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("a stall hook failed", exc_info=exc,
                      extra=fields("hook_failed", runner=self.info.label))
