"""A runner: one process hosting many loops, each under its own lease.

Besides a ``LoopKeeper`` per loop, a runner has three side tasks: the renewer of its
``Leases`` (extends every held lease about every third of its TTL, in one call), the
reporter (sends batched statistics and the runner's heartbeat every second, and spreads
loops across runners) and the ``Watchdog`` (logs passes over their timeout and loops that
stall or fail). A side task that dies is logged and started again: it never ends the
runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ostinato.coordinators.protocol import Coordinator, Denied, Event, Grant, RunnerInfo
from ostinato.errors import ConfigurationError, CoordinatorUnavailable
from ostinato.families import KeySet, PartitionGuard
from ostinato.fleet import Fleet
from ostinato.host import FAREWELL as FAREWELL
from ostinato.host import RUNNER_TTL as RUNNER_TTL
from ostinato.host import Member
from ostinato.keeper import LoopKeeper
from ostinato.leases import FREEZE_FROM as FREEZE_FROM
from ostinato.leases import Leases, freeze_gc
from ostinato.logs import fields
from ostinato.loop import LocalLease, LoopSpec
from ostinato.notices import Stall as Stall
from ostinato.notices import StallHook as StallHook
from ostinato.standbys import Standbys
from ostinato.stats import StatsBook, wall_offset
from ostinato.watchdog import Watchdog

log = logging.getLogger("ostinato.runner")




class Runner(Fleet):
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
        self._freeze_due = False
        #: The statistics with something new to report.
        self._changed: set[StatsBook] = set()
        self.live_runners = 1
        #: Live runners (this one included) that can run each loop, from the last count, by
        #: loop declared (``app:loop``: its partitions and keys all count alike).
        self._candidates: dict[str, int] = {}
        # The other live runners that can run each loop hosted here, by id.
        self._rivals: dict[str, list[str]] = {}
        # How many loops hosted here each declared loop makes, counted when they change.
        self._members: Counter[str] | None = None
        #: Calls to the coordinator by kind (acquire: one batch of requests), since start
        #: (metrics).
        self.calls: Counter[str] = Counter()
        # Leases held and the fair share, as last counted (``share_held``).
        self._held_count = self._share = 0
        # This runner's exact share when every live runner can run every loop it hosts.
        self._even: int | None = None
        self._recount_at = 0.0
        #: How child processes import the app (``isolation="process"``).
        self.app_target = app_target
        shortest = min((spec.lease for spec in specs), default=10.0)
        self.leases = Leases(self, shortest)
        self.standbys = Standbys(self, shortest)
        self.watchdog = Watchdog(self, stall_hooks)
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
        keeper.stats.on_failing = self.watchdog.failing_changed(keeper)
        keeper.stats.changed = self._changed
        self._changed.add(keeper.stats)
        self.keepers[keeper.key] = keeper
        self._members = None
        self.watchdog.forget()
        if self.connected.is_set() and not self.stopping:
            self._start_keeper(keeper)
            if not self._freeze_due and self.leases.freezes_gc():
                # Members of a ``keys=`` loop come after the start, thousands at a time: no
                # collection while they are made (a full one each time their number grew
                # by a quarter: 5 s of CPU for 100,000), then none over them.
                self._freeze_due, collecting = True, gc.isenabled()
                gc.disable()
                self.loop.call_soon(self._freeze_gc, collecting)

    def _freeze_gc(self, collecting: bool) -> None:
        """Keep the keepers, which live as long as the runner, out of the collector's rounds
        (at 100,000 loops its full rounds over them took most of a runner's CPU), and
        collect again if ``collecting`` (it was on before)."""
        self._freeze_due = False
        freeze_gc()
        if collecting:
            gc.enable()

    def _start_keeper(self, keeper: LoopKeeper, *, urgent: bool = False) -> None:
        """Start ``keeper``: its request goes in the next batch (``urgent``: before those
        already waiting), and it gets a task of its own only if it is granted the lease or
        must wait on its own; a standby of an active owner is parked at once. Of 100,000
        loops in a fleet of ten runners, 90,000 thus never need a task. A partition asks its
        count's gate first, in a task."""
        if keeper.gate is not None:
            self._run_keeper(keeper)
            return
        future = self.leases.request(keeper.key, keeper.spec.lease, urgent=urgent)
        future.add_done_callback(functools.partial(self._answered, keeper))

    def _answered(self, keeper: LoopKeeper, future: asyncio.Future[Grant | Denied]) -> None:
        if self.keepers.get(keeper.key) is not keeper:
            return
        if future.cancelled() or future.exception() is not None:
            self._run_keeper(keeper)  # it asks again in its task, and says why it cannot
            return
        answer = future.result()
        if isinstance(answer, Grant):
            self._run_keeper(keeper, answer)
        elif not keeper.parks(answer):
            self._run_keeper(keeper, wait_out=answer)

    def _run_keeper(
        self, keeper: LoopKeeper, answer: Grant | None = None, *, wait_out: Denied | None = None
    ) -> None:
        task = asyncio.create_task(keeper.keep(answer, wait_out=wait_out), name=keeper.key)
        self._keeper_tasks[keeper.key] = task
        task.add_done_callback(lambda _: self._keeper_ended(keeper))

    def _keeper_ended(self, keeper: LoopKeeper) -> None:
        task = self._keeper_tasks.get(keeper.key)
        if task is not None and task.done():  # parked, or gone: no task until it resumes
            del self._keeper_tasks[keeper.key]
        if keeper.retired and self.keepers.get(keeper.key) is keeper:
            del self.keepers[keeper.key]
            self._members = None
            self.watchdog.forget()

    def resume(self, keeper: Member) -> None:
        """A keeper parked as a quiet standby asks again: after a moment if this runner holds
        its fair share already, so that one with fewer loops gets the lease first."""
        found = self.keepers.get(keeper.key)
        if found is not keeper or self.stopping:
            return
        # Woken by an event, not by its owner's silence: the lease was let go. Either way
        # it may be free: its request goes before the others waiting (a runner joining a
        # fleet of 100,000 loops asks for each once, and the loops handed to it meanwhile
        # must not wait for the end of that queue).
        delay = found.yield_delay(released=found.silent_owner is None)
        if delay > 0:
            self.loop.call_later(delay, self._restart, found)
        else:
            self._start_keeper(found, urgent=True)

    def _restart(self, keeper: LoopKeeper) -> None:
        if self.keepers.get(keeper.key) is keeper and not self.stopping:
            self._start_keeper(keeper, urgent=True)

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
        if not await self._until(stop, self.standbys.probe()):
            return
        if self.leases.freezes_gc():
            self._freeze_gc(gc.isenabled())
        keepers = list(self.keepers.values())
        random.shuffle(keepers)  # asked for in an order of this runner's own (``KeySet.apply``)
        for keeper in keepers:
            self._start_keeper(keeper)
        jobs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("renewer", self.leases.renew_forever),
            ("reporter", self._report_forever),
            ("watchdog", self.watchdog.watch_forever),
            ("standbys", self.standbys.watch_forever),
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
        await self.leases.answered(self.grace)
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

    # -- leases: asked of ``Leases`` ---------------------------------------------------

    async def acquire(self, key: str, ttl: float) -> Grant | Denied:
        return await self.leases.acquire(key, ttl)

    async def give_back(self, key: str, lease: LocalLease) -> None:
        await self.leases.give_back(key, lease)

    def lease_granted(self, key: str, lease: LocalLease) -> None:
        self._held_count += 1
        self.leases.granted(self.keepers[key], lease)

    def lease_ended(self, key: str, lease: LocalLease) -> None:
        self.leases.ended(key, lease)

    def hurry(self, key: str) -> bool:
        return self.leases.hurry(key)

    @property
    def renewals(self) -> int:
        return self.leases.renewals

    async def renew_once(self) -> int:
        return await self.leases.renew_once()

    def check_passes(self, now: float, *, everything: bool = True) -> None:
        self.watchdog.check_passes(now, everything=everything)

    def _on_event(self, event: Event) -> None:
        if event.kind == "missed":
            self.standbys.wake_all()
            return
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
            self.leases.renew_now()  # a holder learns at once, from its renewal
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
