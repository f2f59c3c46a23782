"""Loops hosted by job workers (Celery, RQ): one job runs a loop's passes under its lease.

A *link* is one job of a loop's *chain*. It carries the fence its parent held (the
link that enqueued it, or the keeper that forged the chain). It runs only if no
lease of the loop was granted since that parent gave it back: it checks the
coordinator's record first (a duplicate or stale link then ends without taking
the lease), and its own grant must be exactly one fence above the parent's (a
grant that slipped in between makes it stale all the same). So two chains of one
loop cannot both live: the chain whose link took the lease last wins, and every
other link ends on its next turn without running and without enqueueing. The
generation a link reports is the fence its chain was forged at.

A link that runs renews the lease in the background, runs passes for up to its
time budget (so the queue's latency is paid once per budget, not once per pass),
reports the passes the way a runner does, gives the lease back and enqueues
exactly one next link, delayed by the loop's pacing (``every=``, ``pause=``,
``cron=``, the ``IDLE`` and error backoffs). A link that lost its lease while it
ran enqueues nothing: whoever holds the loop now runs it, and a chain that
nobody carries on is re-forged by the keeper (``ostinato.chains``).

Safety rests on the lease alone: two passes never run at the same time while
both hold valid leases, whatever the queue delivers twice. The fence arithmetic
only keeps one chain alive; a fence that jumps (a Redis restarted without
persistence) ends a chain, which the keeper re-forges.

``run_clock_pass`` is the clock mode's job: one pass under the lease, or none if
the previous pass still holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from ostinato.app import App, run_sync
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.coordinators.protocol import (
    Coordinator,
    Denied,
    LoopRecord,
    Renewal,
    RunnerInfo,
)
from ostinato.errors import ConfigurationError, CoordinatorUnavailable
from ostinato.hooks import around_pass, entered
from ostinato.logs import fields
from ostinato.loop import IDLE, LocalLease, LoopSpec, Pass
from ostinato.pacing import Outcome, Plan, Slot, plan_next
from ostinato.runner import RUNNER_TTL
from ostinato.stats import StatsBook, wall_offset

log = logging.getLogger("ostinato.jobs")

#: How often a link reports its passes while it runs (a runner reports every second too).
REPORT_EVERY = 1.0
#: A link that arrives more than this before its start goes back to the queue with the rest
#: of its delay; a shorter wait is spent in the job (a queue without fine delays, such as
#: RQ's scheduler with its one-second turns, gets short delays enqueued at once).
EARLY_WAIT_LIMIT = 5.0
#: How often a waiting link looks whether its worker is shutting down.
STOP_POLL = 0.05

#: What the links of this process did, by outcome (``ran``, ``stale``, ``held``, ...).
COUNTS: Counter[str] = Counter()
_books: dict[str, StatsBook] = {}
_books_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Link:
    """One job of a loop's chain, as it travels through the queue (``encode``/``decode``)."""

    loop: str
    #: The fence the previous link (or the keeper's forge) held: this link runs only
    #: if its own grant is the next one.
    parent: int
    #: The fence the chain was forged at, for logs.
    generation: int
    #: Wall time before which the first pass must not start.
    not_before: float = 0.0
    #: The pacing carried from link to link: the slot the first pass is due at (wall),
    #: the idle and error streaks, the calendar slot of a ``cron=`` loop.
    slot: float | None = None
    idle_streak: int = 0
    error_streak: int = 0
    due: tuple[float, float, int] | None = None

    def encode(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["due"] = None if self.due is None else list(self.due)
        return out

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> Link:
        try:
            due = data.get("due")
            return cls(
                loop=str(data["loop"]), parent=int(data["parent"]),
                generation=int(data["generation"]), not_before=float(data.get("not_before", 0.0)),
                slot=None if data.get("slot") is None else float(data["slot"]),
                idle_streak=int(data.get("idle_streak", 0)),
                error_streak=int(data.get("error_streak", 0)),
                due=None if due is None else (float(due[0]), float(due[1]), int(due[2])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigurationError(f"not an ostinato link: {data!r} ({exc})") from None


#: Puts a link on the queue, to start after the delay (seconds).
Enqueue = Callable[[Link, float], None]


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """How job workers host an app's loops (``attach(..., budget=, patience=)``)."""

    #: How long one link keeps running passes before it hands on to the next link.
    budget: float = 1.0
    #: How late a link may be before the keeper calls its chain broken (``None``: 2 s,
    #: or half the loop's ``stall_after`` when that is shorter).
    patience: float | None = None

    def patience_for(self, spec: LoopSpec) -> float:
        if self.patience is not None:
            return self.patience
        return min(2.0, spec.stall_after / 2) if spec.stall_after else 2.0


def check_hostable(app: App, mode: str) -> None:
    """Refuse, with what to do instead, an app whose loops jobs cannot host."""
    store = app.connect()
    if store is app.connect() and not isinstance(store, MemoryCoordinator):
        raise ConfigurationError(
            f"app {app.name!r} was given a {type(store).__name__} object, but every job and every "
            "worker's keeper opens a connection of its own: give the coordinator as a URL "
            f"(App({app.name!r}, coordinator='redis://...')) or through $OSTINATO_COORDINATOR"
        )
    for spec in app.loops.values():
        if spec.isolated:
            raise ConfigurationError(
                f"loop {app.name}:{spec.name} has isolation='process', which job workers do not "
                "host (each job already runs in a worker process): leave isolation= out, or run "
                "it with `ostinato run`"
            )
        if mode == "clock" and spec.pacing.every is None and spec.pacing.cron is None:
            raise ConfigurationError(
                f"loop {app.name}:{spec.name} has no schedule, so mode='clock' has nothing to "
                "enqueue passes on: give it every= or cron=, or use mode='chain'"
            )


def book(key: str, spec: LoopSpec) -> StatsBook:
    """This process's statistics of loop ``key`` (a forked work horse starts from its parent's)."""
    with _books_lock:
        found = _books.get(key)
        if found is None:
            found = _books[key] = StatsBook(key, spec.stall_after, spec.fail_after)
        return found


async def record_of(store: Coordinator, key: str) -> LoopRecord | None:
    """What the coordinator knows of loop ``key`` (``None``: nothing yet)."""
    for record in await store.loops():
        if record.key == key:
            return record
    return None


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]


def run_link(
    app: App, data: Mapping[str, Any], enqueue: Enqueue, *, worker: RunnerInfo,
    options: JobOptions, stopping: Callable[[], bool] = lambda: False,
) -> str:
    """Run one link of a chain (the body of the Celery task or RQ job); return what it did:
    ``ran``, ``stale``, ``held``, ``paused``, ``lost`` or ``unreachable``."""
    link = Link.decode(data)
    spec = app.loops.get(link.loop)
    if spec is None:
        raise ConfigurationError(
            f"app {app.name!r} has no loop named {link.loop!r} (its loops are "
            f"{app.loop_names()}); a link of it was dropped"
        )
    job = _Job(app, spec, worker, options, stopping)
    outcome = run_sync(job.link(link, enqueue))
    COUNTS[outcome] += 1
    return outcome


def run_clock_pass(
    app: App, name: str, slot: float, *, worker: RunnerInfo, options: JobOptions,
    due: tuple[float, float, int] | None = None,
) -> str:
    """Run one pass of loop ``name`` that the clock enqueued for ``slot`` (wall); return ``ran``,
    or ``skipped`` when its previous pass still holds the lease (never queued behind it)."""
    spec = app.loops.get(name)
    if spec is None:
        raise ConfigurationError(f"app {app.name!r} has no loop named {name!r}")
    job = _Job(app, spec, worker, dataclasses.replace(options, budget=0.0), lambda: False)
    outcome = run_sync(job.clock_pass(slot, due))
    COUNTS[outcome] += 1
    return outcome


class _Job:
    """One job's turn at a loop: the lease, the passes, the report, the next link."""

    def __init__(self, app: App, spec: LoopSpec, worker: RunnerInfo, options: JobOptions,
                 stopping: Callable[[], bool]) -> None:
        self.app, self.spec, self.worker, self.options = app, spec, worker, options
        self.key = f"{app.name}:{spec.name}"
        self.stopping = stopping
        self.book = book(self.key, spec)
        # Wakes the passes' thread: the lease was lost.
        self._nudge = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _fields(self, event: str, fence: int | None = None) -> dict[str, object]:
        return fields(event, loop=self.key, fence=fence, runner=self.worker.label)

    # -- a chain's link ------------------------------------------------------------

    async def link(self, link: Link, enqueue: Enqueue) -> str:
        early = link.not_before - time.time()
        if early > EARLY_WAIT_LIMIT or (early > 0 and self.stopping()):
            # Not its time yet: back to the queue, still the chain's one next link.
            enqueue(link, early)
            return "early"
        while early > 0 and not self.stopping():
            await asyncio.sleep(min(early, STOP_POLL))
            early = link.not_before - time.time()
        outcome, nxt = await self._turn(link)
        if nxt is None:
            return outcome
        try:
            enqueue(nxt, max(0.0, nxt.not_before - time.time()))
        except Exception:
            log.exception("%s: could not enqueue the next link; the keeper re-forges the chain",
                          self.key, extra=self._fields("enqueue_failed", nxt.parent))
            return "lost"
        return outcome

    async def _turn(self, link: Link) -> tuple[str, Link | None]:
        """Take the lease if this link is the chain's next, run its passes, give the lease back;
        return what happened and the next link to enqueue, if any."""
        store = self.app.connect()
        try:
            await store.open()
            record = await record_of(store, self.key)
            refused = self._refusal(link, record)
            if refused is not None:
                return refused, None
            owner = RunnerInfo.here(hosts=self.worker.hosts)
            sent = time.monotonic()
            answer = await store.acquire(self.key, owner, self.spec.lease)
            if isinstance(answer, Denied):
                log.info("%s: a link of generation %d found the lease held: it ends without running",
                         self.key, link.generation, extra=self._fields("link_duplicate"))
                return ("paused" if answer.paused else "held"), None
            if answer.fence != link.parent + 1:
                log.info("%s: a link of generation %d is stale (fence %d granted, %d expected): it "
                         "ends without running", self.key, link.generation, answer.fence,
                         link.parent + 1, extra=self._fields("link_stale", answer.fence))
                await store.release(self.key, owner, answer.fence)
                return "stale", None
            lease = LocalLease(answer.fence, self.spec.lease, max(sent, answer.sent or sent), answer.bound)
            plan = await self._hold(store, owner, lease, link)
            if plan is None:
                return "lost", None
            if not await store.release(self.key, owner, lease.fence):
                log.warning("%s: the lease ran out before the link gave it back: no next link; "
                            "the keeper re-forges the chain", self.key,
                            extra=self._fields("link_lost", lease.fence))
                return "lost", None
            due = plan.due
            return "ran", Link(
                self.spec.name, parent=lease.fence, generation=link.generation,
                not_before=plan.start_at(), slot=plan.slot, idle_streak=plan.idle_streak,
                error_streak=plan.error_streak,
                due=None if due is None else (due.at, due.start, due.missed),
            )
        except CoordinatorUnavailable as exc:
            log.error("%s: a link cannot reach the coordinator (%s): it ends; the keeper re-forges "
                      "the chain once the coordinator is back", self.key, exc,
                      extra=self._fields("coordinator_unreachable"))
            return "unreachable", None
        finally:
            with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
                await asyncio.wait_for(store.close(), 1.0)

    def _refusal(self, link: Link, record: LoopRecord | None) -> str | None:
        """Why this link must not even ask for the lease, if it must not."""
        if record is None:
            return None
        if record.paused:
            log.info("%s: paused: the chain ends here; the keeper starts it again on resume",
                     self.key, extra=self._fields("link_paused"))
            return "paused"
        if record.fence != link.parent:
            log.info("%s: a link of generation %d is stale (fence %d since its parent's %d): it ends "
                     "without running", self.key, link.generation, record.fence, link.parent,
                     extra=self._fields("link_stale", record.fence))
            return "stale"
        if record.holder is not None:
            log.info("%s: a link of generation %d found the lease held by %s: it ends without running",
                     self.key, link.generation, record.holder, extra=self._fields("link_duplicate"))
            return "held"
        return None

    # -- a clock's pass ------------------------------------------------------------

    async def clock_pass(self, slot: float, due: tuple[float, float, int] | None) -> str:
        store = self.app.connect()
        try:
            await store.open()
            owner = RunnerInfo.here(hosts=self.worker.hosts)
            sent = time.monotonic()
            answer = await store.acquire(self.key, owner, self.spec.lease)
            if isinstance(answer, Denied):
                log.warning("%s: the pass due at %s is skipped: %s", self.key,
                            datetime.fromtimestamp(slot).isoformat(timespec="milliseconds"),
                            "the loop is paused" if answer.paused else
                            f"its previous pass still runs ({answer.holder or 'holder unknown'})",
                            extra=self._fields("pass_skipped"))
                return "skipped"
            lease = LocalLease(answer.fence, self.spec.lease, max(sent, answer.sent or sent), answer.bound)
            link = Link(self.spec.name, parent=lease.fence - 1, generation=lease.fence, not_before=slot,
                        slot=slot, due=due)
            await self._hold(store, owner, lease, link)
            await store.release(self.key, owner, lease.fence)
            return "ran"
        except CoordinatorUnavailable as exc:
            log.error("%s: a pass cannot reach the coordinator (%s): skipped", self.key, exc,
                      extra=self._fields("coordinator_unreachable"))
            return "unreachable"
        finally:
            with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
                await asyncio.wait_for(store.close(), 1.0)

    # -- holding the lease while passes run ----------------------------------------

    async def _hold(
        self, store: Coordinator, owner: RunnerInfo, lease: LocalLease, link: Link
    ) -> Plan | None:
        """Renew ``lease`` and report while the passes run in a thread; report once more at the
        end. Returns the plan for the next link, or ``None`` if the lease was lost."""
        self._loop = asyncio.get_running_loop()
        sides = [asyncio.create_task(self._renew(store, owner, lease)),
                 asyncio.create_task(self._report_forever(store))]
        try:
            plan = await asyncio.to_thread(self._passes, lease, link)
        finally:
            for task in sides:
                task.cancel()
            await asyncio.gather(*sides, return_exceptions=True)
        if plan is not None:
            schedule = self.spec.pacing.schedule
            self.book.zone = None if schedule is None else schedule.zone_name
            self.book.next_start = plan.start_at()
        # Reported before the lease is given back: the keeper then knows the next start.
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(self._report(store), max(0.05, lease.deadline - time.monotonic()))
        lost = lease.deadline == float("-inf")
        return None if lost else plan

    async def _renew(self, store: Coordinator, owner: RunnerInfo, lease: LocalLease) -> None:
        while True:
            await asyncio.sleep(max(0.0, lease.renew_at - time.monotonic()))
            sent = time.monotonic()
            try:
                answers = await asyncio.wait_for(
                    store.renew(owner, {self.key: (lease.fence, lease.ttl)}),
                    max(lease.deadline - sent, 0.001),
                )
            except (CoordinatorUnavailable, TimeoutError) as exc:
                self._lose(lease, f"coordinator unreachable: {exc or 'the renewal timed out'}")
                return
            answer = answers.get(self.key, Renewal.LOST)
            if answer is not Renewal.HELD:
                why = "the loop was paused" if answer is Renewal.PAUSED else "another holder has it now"
                self._lose(lease, why)
                return
            lease.extend(sent)

    def _lose(self, lease: LocalLease, why: str) -> None:
        lease.revoke()
        log.warning("%s: lease lost (fence %d): %s; this link ends without a next one", self.key,
                    lease.fence, why, extra=self._fields("lease_lost", lease.fence))
        self._nudge.set()

    async def _report_forever(self, store: Coordinator) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            with contextlib.suppress(CoordinatorUnavailable):
                await self._report(store)

    async def _report(self, store: Coordinator) -> None:
        stats = self.book.pending(wall_offset())
        await store.report(self.worker, RUNNER_TTL, [] if stats is None else [stats])
        if stats is not None:
            self.book.sent(stats)

    # -- the passes, in a thread of their own ----------------------------------------

    def _passes(self, lease: LocalLease, link: Link) -> Plan | None:
        """Run passes while the lease holds and the budget lasts; return the plan for the next
        pass (``None``: the lease was lost)."""
        end_by = time.monotonic() + self.options.budget
        plan = Plan(not_before=link.not_before, idle_until=link.not_before,
                    slot=link.not_before if link.slot is None else link.slot,
                    idle_streak=link.idle_streak, error_streak=link.error_streak,
                    due=None if link.due is None else Slot(*link.due))
        number = 0
        while True:
            if lease.deadline == float("-inf"):
                return None
            now = time.monotonic()
            wait = plan.start_at() - time.time()
            if number and (self.stopping() or now + max(wait, 0.0) >= end_by):
                return plan  # the next pass belongs to the next link
            if wait > 0:
                self._nudge.wait(min(wait, STOP_POLL * 4))
                continue
            if not lease.holds(now):
                return None if lease.deadline == float("-inf") or not lease.valid(now) else plan
            number += 1
            plan = self._one_pass(lease, number, plan)

    def _one_pass(self, lease: LocalLease, number: int, plan: Plan) -> Plan:
        spec, stats = self.spec, self.book
        now = time.monotonic()
        schedule = spec.pacing.schedule
        due = plan.due
        ctx = Pass(spec.name, lease, number, now, app=self.app.name,
                   scheduled_for=None if due is None or schedule is None
                   else datetime.fromtimestamp(due.at, schedule.zone),
                   missed=0 if due is None else due.missed)
        stats.started(now)
        try:
            if hooks := around_pass():
                with entered(hooks, ctx, spec) as outcomes:
                    result = self._call(ctx)
                    for told in outcomes:
                        told.outcome = "idle" if result is IDLE else "worked"
            else:
                result = self._call(ctx)
        except Exception as exc:
            end = time.monotonic()
            outcome = Outcome.FAILED
            stats.failed(end, _error_text(exc))
            log.error("%s: pass %d failed", self.key, number, exc_info=exc,
                      extra=self._fields("pass_failed", lease.fence))
        else:
            end = time.monotonic()
            outcome = Outcome.IDLE if result is IDLE else Outcome.WORKED
        stats.finished(now, end, outcome.value)
        wall_end = time.time()
        return plan_next(spec.pacing, slot=plan.slot, end=wall_end, wall_end=wall_end, outcome=outcome,
                         idle_streak=plan.idle_streak, error_streak=plan.error_streak, due=due,
                         seed=self.key)

    def _call(self, ctx: Pass) -> Any:
        spec = self.spec
        if not spec.is_async:
            return spec.body(ctx)
        assert self._loop is not None

        async def bounded() -> Any:
            async with asyncio.timeout(spec.timeout):
                return await spec.body(ctx)

        return asyncio.run_coroutine_threadsafe(bounded(), self._loop).result()
