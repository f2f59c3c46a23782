"""The watchdog of a runner: passes over their timeout, loops that stall or fail, and the
stall hooks told of each as it begins and ends.

A loop's statistics tell the watchdog at once when the loop starts or stops failing; it
looks at loops with a ``timeout`` or ``stall_after`` on every round, and at every loop on
one round in ``SWEEP_EVERY``, as a backstop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ostinato.coordinators.protocol import RunnerInfo
from ostinato.keeper import LoopKeeper
from ostinato.logs import fields
from ostinato.notices import Stall, StallHook

log = logging.getLogger("ostinato.runner")

#: The watchdog looks at every loop (not only those with a timeout or stall_after) once in
#: this many rounds.
SWEEP_EVERY = 10


class Watched(Protocol):
    """The runner, as its watchdog sees it."""

    @property
    def keepers(self) -> Mapping[str, LoopKeeper]: ...

    info: RunnerInfo
    wall_offset: float
    stopping: bool
    loop: asyncio.AbstractEventLoop

    async def wait(self, seconds: float, *early: asyncio.Event) -> None: ...


class Watchdog:
    """Watches the loops of ``runner``; calls ``hooks`` with a ``Stall`` notice as trouble
    begins and ends."""

    def __init__(self, runner: Watched, hooks: Sequence[StallHook] = ()) -> None:
        self.runner = runner
        self.hooks = list(hooks)
        #: The loops looked at on every round (``None``: to be listed again).
        self._watched: list[LoopKeeper] | None = None
        self._hook_tasks: set[asyncio.Future[object]] = set()

    def forget(self) -> None:
        """The loops hosted changed: list the watched ones again."""
        self._watched = None

    async def watch_forever(self) -> None:
        limits = [
            s for k in self.runner.keepers.values() for s in (k.spec.timeout, k.spec.stall_after) if s
        ]
        interval = min(1.0, max(0.05, min(limits) / 4)) if limits else 1.0
        rounds = 0
        while not self.runner.stopping:
            self.check_passes(time.monotonic(), everything=rounds % SWEEP_EVERY == 0)
            rounds += 1
            await self.runner.wait(interval)

    def check_passes(self, now: float, *, everything: bool = True) -> None:
        """Log passes over their timeout (every timeout again) and stalls as they start and end.

        A loop's statistics tell the runner at once when it starts or stops failing; the
        watchdog looks at every loop only on ``everything`` rounds, as a backstop, and at
        loops with a ``timeout`` or ``stall_after`` on each round."""
        if everything or self._watched is None:
            self._watched = [k for k in self.runner.keepers.values()
                             if k.spec.timeout is not None or k.spec.stall_after is not None]
        for keeper in self.runner.keepers.values() if everything else self._watched:
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
                                     runner=self.runner.info.label),
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
            loop=keeper.key, holder=self.runner.info.label, fence=lease.fence,
            last_pass_end=None if last_end is None else last_end + self.runner.wall_offset,
            stalled_for=stalled_for, recovered=recovered, reason=reason,
            failed_passes=failed_passes, last_error=last_error,
        )
        extra = fields("recovered" if recovered else reason, loop=keeper.key, fence=lease.fence,
                       runner=self.runner.info.label)
        return notice, extra

    def failing_changed(self, keeper: LoopKeeper) -> Callable[[], object]:
        """What a loop's statistics call when failing may have started or ended: a look at
        it on the event loop at once, not at the watchdog's next round."""

        def look() -> None:
            if keeper.lease is not None and not self.runner.stopping:
                self._check_failing(keeper, time.monotonic())

        return lambda: self.runner.loop.call_soon_threadsafe(look)

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
        for hook in self.hooks:
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
                      extra=fields("hook_failed", runner=self.runner.info.label))
