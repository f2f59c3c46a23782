"""Helpers for testing code that uses ostinato: run a loop's passes without a runner, an
in-memory coordinator, and a clock you move.

::

    from ostinato.testing import run_passes

    def test_aggregate_drains_the_inbox():
        fill_inbox(3)
        (first, second) = run_passes(app, "aggregate", 2)
        assert first.outcome == "worked" and second.result is ostinato.IDLE
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ostinato.coordinators.memory import MemoryCoordinator, MemoryStore, memory_store
from ostinato.coordinators.protocol import Grant, RunnerInfo
from ostinato.errors import ConfigurationError, UnknownLoopError
from ostinato.loop import IDLE, LocalLease, Pass

if TYPE_CHECKING:
    from ostinato.app import App

__all__ = [
    "FakeClock", "MemoryCoordinator", "MemoryStore", "PassResult", "memory_store", "run_passes",
    "run_passes_async",
]


@dataclass(frozen=True)
class PassResult:
    """How one pass run by ``run_passes`` ended."""

    number: int
    fence: int
    #: ``"worked"``, ``"idle"`` (the body returned ``ostinato.IDLE``) or ``"failed"``.
    outcome: str
    #: What the body returned (``None`` when it raised).
    result: Any
    #: What it raised, if it did; ``traceback`` is the formatted traceback.
    error: BaseException | None
    traceback: str | None
    duration: float

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"


def run_passes(
    app: App, name: str, count: int = 1, *, scheduled_for: datetime | None = None, missed: int = 0,
) -> list[PassResult]:
    """Run ``count`` passes of loop ``name`` of ``app`` here and now, one after the other,
    and return how each ended: no runner, no pacing, no waiting.

    The lease the passes run under comes from a new ``memory://`` coordinator of their
    own, so ``ctx.fence``, ``ctx.holds()`` and ``ostinato.fenced`` behave as under a
    runner; the app's own coordinator is not touched. An ``async def`` body runs in an
    event loop of its own (call this from sync tests, or use ``run_passes_async``). A
    pass that raises is recorded, not raised: the next pass still runs, as it would in
    a runner. ``isolation="process"`` loops run in this process too.
    """
    if count < 1:
        raise ConfigurationError(f"count must be at least 1, not {count!r}")
    spec = app.loops.get(name.removeprefix(f"{app.name}:"))
    if spec is None:
        raise UnknownLoopError(
            f"app {app.name!r} has no loop named {name!r}; its loops are {app.loop_names()}"
        )
    lease = asyncio.run(_lease(f"{app.name}:{spec.name}", spec.lease))
    results = []
    for number in range(1, count + 1):
        ctx = Pass(spec.name, lease, number, time.monotonic(), app=app.name,
                   scheduled_for=scheduled_for, missed=missed)
        started = time.perf_counter()
        try:
            result = spec.body(ctx)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
        except Exception as exc:
            took = time.perf_counter() - started
            results.append(PassResult(number, lease.fence, "failed", None, exc,
                                      traceback.format_exc(), took))
            continue
        took = time.perf_counter() - started
        outcome = "idle" if result is IDLE else "worked"
        results.append(PassResult(number, lease.fence, outcome, result, None, None, took))
    return results


async def run_passes_async(
    app: App, name: str, count: int = 1, *, scheduled_for: datetime | None = None, missed: int = 0,
) -> list[PassResult]:
    """``run_passes`` for async tests: runs in a worker thread, so an ``async def`` body
    gets an event loop of its own and never blocks the test's."""
    return await asyncio.to_thread(run_passes, app, name, count, scheduled_for=scheduled_for,
                                   missed=missed)


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def _lease(key: str, ttl: float) -> LocalLease:
    coordinator = MemoryCoordinator(f"testing-{uuid.uuid4().hex}")
    sent = time.monotonic()
    grant = await coordinator.acquire(key, RunnerInfo.here(), max(ttl, 3600.0))
    assert isinstance(grant, Grant)
    return LocalLease(grant.fence, max(ttl, 3600.0), sent)


@dataclass
class FakeClock:
    """A monotonic clock that moves only when told: ``MemoryStore(clock=clock)``."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
