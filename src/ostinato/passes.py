"""How a loop's keeper drives its passes while it holds the lease.

A sync body runs its passes in a thread (from ``ostinato.workers``, which starts one
whenever none is free) for as long as it has work, so a slow loop never delays another
and back-to-back passes cost no hand-off between threads; when its next pass is more than
``PARK_AFTER`` away it gives the thread back and waits on the event loop. ``async def``
bodies run on the event loop. When to start comes from ``pacing``, whether the lease
still holds from ``LocalLease``; this module only drives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from ostinato.errors import CoordinatorUnavailable
from ostinato.hooks import PassOutcome, around_pass, entered
from ostinato.host import FAREWELL, RUNNER_TTL, Host
from ostinato.isolation import IsolatedBody, PassError
from ostinato.loop import IDLE, LocalLease, LoopSpec, Pass
from ostinato.pacing import Outcome, Plan, Slot, plan_next
from ostinato.stats import StatsBook
from ostinato.workers import WORKERS

log = logging.getLogger("ostinato.loop")

#: While the session holding a lease is unheard, a pass driver in a thread looks again
#: this often, then half as often each time, up to the slowest; an async one is woken when
#: the session is heard (and looks at the slowest pace meanwhile, as a backstop).
SUSPENDED_POLL = 0.01
SUSPENDED_POLL_SLOWEST = 0.2
#: A sync loop whose next pass is further off than this gives its thread back meanwhile.
PARK_AFTER = 0.25


def _settle(outcomes: list[PassOutcome], result: object) -> None:
    """Tell the hooks around a pass how it ended."""
    for outcome in outcomes:
        outcome.outcome = "idle" if result is IDLE else "worked"


class Signal:
    """``asyncio.Event`` without its deque of waiters (some 600 bytes): a keeper keeps two,
    and a runner may keep ten thousand keepers. On the event loop's thread only."""

    __slots__ = ("_flag", "_waiters")

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


async def _signalled(signal: Signal, within: float) -> None:
    """Wait until ``signal`` is set, or ``within`` seconds have passed (then it is set, and the
    caller clears it): one timer and no task, where ``wait_for`` makes a task per wait."""
    timer = asyncio.get_running_loop().call_later(within, signal.set)
    try:
        await signal.wait()
    finally:
        timer.cancel()


@dataclasses.dataclass
class _Course:
    """Where a sync loop's passes are between two stretches in a thread."""

    slot: float
    not_before: float
    idle_until: float = 0.0
    idle_streak: int = 0
    error_streak: int = 0
    number: int = 0


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, PassError):
        return exc.summary
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]


class PassDriver:
    """The half of ``ostinato.keeper.LoopKeeper`` that runs passes while the lease holds;
    its state is the keeper's, declared here."""

    runner: Host
    spec: LoopSpec
    stats: StatsBook
    key: str
    partition: int | None
    member_key: str | None
    _signal: threading.Event | None
    _woken: bool
    _async_signal: Signal | None
    _async_pass: asyncio.Task[Any] | None
    _cancelled_for_lease: bool
    _due: Slot | None
    _handed_over_fence: int | None
    _abort: list[bool]

    def _fields(self, event: str, fence: int | None = None) -> dict[str, object]:
        raise NotImplementedError

    def _leaving(self) -> bool:
        raise NotImplementedError

    # -- sync bodies: a thread while there is work ------------------------------

    async def _run_thread(self, lease: LocalLease, first: float) -> bool:
        """Run passes in a thread; return whether they have finished (False: still in a pass).

        A plain sync loop gives its thread back whenever its next pass is more than
        ``PARK_AFTER`` away, and waits on the event loop meanwhile (``_park``); an isolated
        loop keeps a thread of its own for as long as it holds the lease.
        """
        course = _Course(slot=first, not_before=first)
        park = not self.spec.isolated
        signal = self._async_signal = Signal()
        try:
            while True:
                signal.clear()  # before the stretch: a notice from here on ends the park
                done = self._stretch(lease, course, park)
                try:
                    resume_at = await asyncio.shield(done)
                except asyncio.CancelledError:
                    # The runner gave up waiting: a sync pass cannot be interrupted, so the
                    # lease is left to expire rather than handed to a standby mid-pass.
                    return done.done()
                except Exception:
                    log.exception("%s: the pass driver failed; starting it again", self.key,
                                  extra=self._fields("driver_failed", lease.fence))
                    return True
                if resume_at is None:
                    return True
                await _signalled(signal, resume_at - time.monotonic())
        finally:
            self._async_signal = None

    def _stretch(self, lease: LocalLease, course: _Course, park: bool) -> asyncio.Future[float | None]:
        """Passes in a pooled thread until the lease is done with (``None``) or, with ``park``,
        until the next pass is far off (when it is due)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float | None] = loop.create_future()

        def settle(result: float | None, exc: BaseException | None) -> None:
            if not done.done():
                if exc is None:
                    done.set_result(result)
                else:
                    done.set_exception(exc)

        def job() -> None:
            try:
                result = self._passes_in_thread(lease, course, park)
            except BaseException as exc:  # a bug here must not end the loop silently
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        WORKERS.run(job)
        return done

    def _passes_in_thread(self, lease: LocalLease, course: _Course, park: bool) -> float | None:
        spec = self.spec
        body: Callable[[Pass], Any] = spec.body
        if spec.isolated:
            isolated = IsolatedBody(self, lease)
            try:
                return self._passes(lease, course, isolated.call, park=False)
            finally:
                isolated.close()
        return self._passes(lease, course, body, park=park)

    def _passes(
        self, lease: LocalLease, course: _Course, body: Callable[[Pass], Any], *, park: bool
    ) -> float | None:
        spec, stats, signal, runner = self.spec, self.stats, self._signal, self.runner
        assert signal is not None  # every loop run in a thread has one
        pacing = spec.pacing
        back_to_back = pacing.every is None and pacing.pause is None and pacing.cron is None
        slot, not_before, idle_until = course.slot, course.not_before, course.idle_until
        idle_streak, error_streak, number = course.idle_streak, course.error_streak, course.number
        poll = SUSPENDED_POLL
        while True:
            if runner.stopping or self._leaving():
                return None
            now = time.monotonic()
            if self._woken:
                self._woken = False
                idle_until = now
            start_at = not_before if not_before > idle_until else idle_until
            if now < start_at:
                if park and start_at - now > PARK_AFTER:
                    course.slot, course.not_before, course.idle_until = slot, not_before, idle_until
                    course.idle_streak, course.error_streak = idle_streak, error_streak
                    course.number = number
                    return start_at
                # No cap at the lease's TTL: whatever ends the lease (a failed renewal, a
                # revocation, a pause, the runner stopping) also sets the signal.
                signal.wait(start_at - now)
                # Cleared after the wait, then every flag is read again at the top,
                # so a notice that arrives in between is not lost.
                signal.clear()
                continue
            if not lease.holds(now):
                if lease.suspended(now):
                    signal.wait(poll)
                    signal.clear()
                    poll = min(poll * 2, SUSPENDED_POLL_SLOWEST)
                    continue
                return None
            poll = SUSPENDED_POLL
            number += 1
            stats.started(now)
            try:
                ctx = self._context(lease, number, now)
                if hooks := around_pass():
                    with entered(hooks, ctx, spec) as outcomes:
                        result = body(ctx)
                        _settle(outcomes, result)
                else:
                    result = body(ctx)
            except BaseException as exc:
                end = time.monotonic()
                outcome = Outcome.FAILED
                stats.failed(end, _error_text(exc))
                log.error("%s: pass %d failed", self.key, number, exc_info=exc,
                          extra=self._fields("pass_failed", lease.fence))
            else:
                end = time.monotonic()
                outcome = Outcome.IDLE if result is IDLE else Outcome.WORKED
            stats.finished(now, end, outcome.value)
            if back_to_back and outcome is Outcome.WORKED:
                # What plan_next would say, without its cost on the hottest path.
                slot = not_before = end
                idle_streak = error_streak = 0
                continue
            plan = self._plan(slot, end, outcome, idle_streak, error_streak)
            slot, not_before, idle_until = plan.slot, plan.not_before, plan.idle_until
            idle_streak, error_streak = plan.idle_streak, plan.error_streak

    def _plan(
        self, slot: float, end: float, outcome: Outcome, idle_streak: int, error_streak: int
    ) -> Plan:
        plan = plan_next(
            self.spec.pacing,
            slot=slot,
            end=end,
            wall_end=end + self.runner.wall_offset,
            outcome=outcome,
            idle_streak=idle_streak,
            error_streak=error_streak,
            due=self._due,
            seed=self.key,
        )
        self._due = plan.due
        self._show_next(plan.start_at() + self.runner.wall_offset)
        return plan

    def _context(self, lease: LocalLease, number: int, now: float) -> Pass:
        """The ``Pass`` of a pass starting now, with the calendar slot it stands for."""
        due, schedule = self._due, self.spec.pacing.schedule
        return Pass(
            self.spec.name, lease, number, now, app=self.runner.app_name,
            partition=self.partition, key=self.member_key,
            partitions=self.spec.partitions if self.partition is not None else None,
            scheduled_for=None if due is None or schedule is None
            else datetime.fromtimestamp(due.at, schedule.zone),
            missed=0 if due is None else due.missed,
        )

    def _show_next(self, wall: float) -> None:
        """Tell status when the next pass is planned (``every=`` and ``cron=`` loops only)."""
        pacing = self.spec.pacing
        schedule = pacing.schedule
        self.stats.zone = None if schedule is None else schedule.zone_name
        self.stats.next_start = wall if schedule is not None or pacing.every is not None else None
        self.stats.touch()

    async def _record_start(self) -> None:
        """Before a ``catchup=`` loop's lease is given back, record its last start at once:
        the next holder reads it to tell which slots were missed, so it must not miss a
        pass that started since the last report."""
        stats = self.stats.pending(self.runner.wall_offset)
        if self.spec.pacing.catchup is None or stats is None:
            return
        # Counts are left to the reporter, which sends them once; only the times go now.
        times = dataclasses.replace(stats, passes=0, errors=0)
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            async with asyncio.timeout(FAREWELL if self.runner.stopping else None):
                await self.runner.coordinator.report(self.runner.info, RUNNER_TTL, [times])

    # -- async bodies: on the event loop ---------------------------------------

    async def _run_async(self, lease: LocalLease, first: float) -> None:
        spec, stats, runner = self.spec, self.stats, self.runner
        body: Callable[[Pass], Awaitable[Any]] = spec.body
        signal = self._async_signal = Signal()
        slot = not_before = first
        idle_until = 0.0
        idle_streak = error_streak = number = 0
        try:
            while True:
                signal.clear()
                if runner.stopping or self._leaving():
                    return
                now = time.monotonic()
                if self._woken:
                    self._woken = False
                    idle_until = now
                start_at = max(not_before, idle_until)
                if now < start_at:
                    await _signalled(signal, start_at - now)
                    continue
                if not lease.holds(now):
                    if lease.suspended(now):
                        if lease.bound is not None:
                            lease.bound.wake_when_heard(signal)
                        await _signalled(signal, SUSPENDED_POLL_SLOWEST)
                        continue
                    return
                number += 1
                stats.started(now)
                self._async_pass = asyncio.current_task()
                try:
                    ctx = self._context(lease, number, now)
                    async with asyncio.timeout(spec.timeout):
                        if hooks := around_pass():
                            with entered(hooks, ctx, spec) as outcomes:
                                result = await body(ctx)
                                _settle(outcomes, result)
                        else:
                            result = await body(ctx)
                except asyncio.CancelledError:
                    if not self._cancelled_for_lease:
                        raise
                    # Cancelled by lose(): the lease is gone, so the pass had to end.
                    self._cancelled_for_lease = False
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()
                    end = time.monotonic()
                    outcome = Outcome.FAILED
                    stats.failed(end, "CancelledError: the lease was lost while the pass ran")
                except Exception as exc:
                    end = time.monotonic()
                    outcome = Outcome.FAILED
                    if isinstance(exc, TimeoutError) and spec.timeout is not None and (
                        end - now >= spec.timeout
                    ):
                        log.error(
                            "%s: pass %d cancelled after its timeout of %ss",
                            self.key, number, spec.timeout,
                            extra=self._fields("pass_timed_out", lease.fence),
                        )
                        stats.failed(end, f"TimeoutError: pass ran over its timeout of {spec.timeout}s")
                    else:
                        stats.failed(end, _error_text(exc))
                        log.error("%s: pass %d failed", self.key, number, exc_info=exc,
                          extra=self._fields("pass_failed", lease.fence))
                else:
                    end = time.monotonic()
                    outcome = Outcome.IDLE if result is IDLE else Outcome.WORKED
                finally:
                    self._async_pass = None
                stats.finished(now, end, outcome.value)
                plan = self._plan(slot, end, outcome, idle_streak, error_streak)
                slot, not_before, idle_until = plan.slot, plan.not_before, plan.idle_until
                idle_streak, error_streak = plan.idle_streak, plan.error_streak
                if plan.start_at() <= end:
                    await asyncio.sleep(0)  # let renewals and other loops in between passes
        finally:
            self._async_signal = None
            if stats.running_since is not None:
                stats.running_since = None
