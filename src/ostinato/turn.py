"""A job's turn at a loop: passes run while the job holds the loop's lease.

A job of a job worker (a link of a chain, a clock's pass) that was granted the
lease builds a ``Turn``: the lease is renewed in the background (about every
third of its TTL, as a runner does), the passes run in a thread of their own for
up to the turn's budget, and the statistics are reported the way a runner
reports them (every second, and once more at the end), as the worker process
it runs in (``reporter``), so status, the page and the metrics show job-hosted
loops like any other. A renewal that fails stops the passes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ostinato.coordinators.protocol import Coordinator, Renewal, RunnerInfo
from ostinato.errors import CoordinatorUnavailable
from ostinato.hooks import around_pass, entered
from ostinato.logs import fields
from ostinato.loop import IDLE, LocalLease, LoopSpec, Pass
from ostinato.pacing import Outcome, Plan, plan_next
from ostinato.runner import RUNNER_TTL
from ostinato.stats import StatsBook, wall_offset

log = logging.getLogger("ostinato.jobs")

#: How often a turn reports its passes while it runs (a runner reports every second too).
REPORT_EVERY = 1.0
#: How often a turn waiting for its next pass looks whether its worker is shutting down.
STOP_POLL = 0.2
#: How long the renewer and the reporter may take to end once the passes have ended.
SIDES_END_WITHIN = 1.0

_books: dict[str, StatsBook] = {}
_books_lock = threading.Lock()


def book(key: str, spec: LoopSpec) -> StatsBook:
    """This process's statistics of loop ``key`` (a forked work horse starts from its parent's)."""
    with _books_lock:
        found = _books.get(key)
        if found is None:
            found = _books[key] = StatsBook(key, spec.stall_after, spec.fail_after)
        return found


def reporter(worker: RunnerInfo) -> RunnerInfo:
    """Who a job reports as: the worker's process it runs in (a pool process, a work horse, or
    the worker's own), under an id of its own: a coordinator may lock a runner's id for as
    long as one connection reports under it (SQLite), so two processes never share one."""
    pid = os.getpid()
    return RunnerInfo(id=f"{worker.id}.{pid}", host=worker.host, pid=pid, hosts=worker.hosts)


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]


class Turn:
    """One job's hold of loop ``spec`` of app ``app`` under ``lease``, granted to ``owner``."""

    def __init__(
        self, app: str, spec: LoopSpec, *, store: Coordinator, owner: RunnerInfo, worker: RunnerInfo,
        lease: LocalLease, budget: float, stopping: Callable[[], bool],
    ) -> None:
        self.app, self.spec, self.store, self.owner = app, spec, store, owner
        self.worker = reporter(worker)
        self.lease, self.budget, self.stopping = lease, budget, stopping
        self.key = f"{app}:{spec.name}"
        self.book = book(self.key, spec)
        # Wakes the passes' thread: the lease was lost.
        self._nudge = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done = asyncio.Event()

    @property
    def lost(self) -> bool:
        return self.lease.deadline == float("-inf")

    def _fields(self, event: str) -> dict[str, object]:
        return fields(event, loop=self.key, fence=self.lease.fence, runner=self.worker.label)

    async def run(self, plan: Plan) -> Plan | None:
        """Run passes from ``plan`` on; return the plan for the pass after them, reported as the
        loop's next start, or ``None`` if the lease was lost."""
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        sides = [asyncio.create_task(self._renew()), asyncio.create_task(self._report_forever())]
        try:
            after = await asyncio.to_thread(self._passes, plan)
        finally:
            # The side tasks end at their next turn: cancelling one inside a client's call
            # is not always heard (a client may swallow it), and must not hang the job.
            self._done.set()
            _, late = await asyncio.wait(sides, timeout=SIDES_END_WITHIN)
            for task in late:
                task.cancel()
        if after is not None and not self.lost:
            schedule = self.spec.pacing.schedule
            self.book.zone = None if schedule is None else schedule.zone_name
            self.book.next_start = after.start_at()
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(self.report(), max(0.05, self.lease.deadline - time.monotonic()))
        return None if self.lost else after

    async def report(self) -> None:
        stats = self.book.pending(wall_offset())
        await self.store.report(self.worker, RUNNER_TTL, [] if stats is None else [stats])
        if stats is not None:
            self.book.sent(stats)

    async def _until_done(self, seconds: float) -> bool:
        """Wait up to ``seconds``; whether the passes have ended meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), max(seconds, 0.0))
        return self._done.is_set()

    async def _report_forever(self) -> None:
        while not await self._until_done(REPORT_EVERY):
            with contextlib.suppress(CoordinatorUnavailable):
                await self.report()

    async def _renew(self) -> None:
        lease = self.lease
        while not await self._until_done(lease.renew_at - time.monotonic()):
            sent = time.monotonic()
            try:
                answers = await asyncio.wait_for(
                    self.store.renew(self.owner, {self.key: (lease.fence, lease.ttl)}),
                    max(lease.deadline - sent, 0.001),
                )
            except (CoordinatorUnavailable, TimeoutError) as exc:
                self._lose(f"coordinator unreachable: {exc or 'the renewal timed out'}")
                return
            answer = answers.get(self.key, Renewal.LOST)
            if answer is not Renewal.HELD:
                self._lose("the loop was paused" if answer is Renewal.PAUSED else "another holder has it now")
                return
            lease.extend(sent)

    def _lose(self, why: str) -> None:
        self.lease.revoke()
        log.warning("%s: lease lost (fence %d): %s; this job starts no more passes", self.key,
                    self.lease.fence, why, extra=self._fields("lease_lost"))
        self._nudge.set()

    # -- the passes, in a thread of their own ----------------------------------------

    def _passes(self, plan: Plan) -> Plan | None:
        """Run passes while the lease holds and the budget lasts (at least one)."""
        lease = self.lease
        end_by = time.monotonic() + self.budget
        number = 0
        while not self.lost:
            now = time.monotonic()
            wait = plan.start_at() - time.time()
            if number and (self.stopping() or now + max(wait, 0.0) >= end_by):
                return plan  # the next pass belongs to the next job
            if wait > 0:
                self._nudge.wait(min(wait, STOP_POLL))
                continue
            if not lease.holds(now):
                # Its session unheard (PostgreSQL), or the lease ran out unrenewed: no pass.
                return plan if lease.valid(now) else None
            number += 1
            plan = self._one_pass(number, plan)
        return None

    def _one_pass(self, number: int, plan: Plan) -> Plan:
        spec, stats = self.spec, self.book
        now = time.monotonic()
        schedule, due = spec.pacing.schedule, plan.due
        ctx = Pass(spec.name, self.lease, number, now, app=self.app,
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
                      extra=self._fields("pass_failed"))
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
