"""Runners inside one process on the memory coordinator: the loop rules, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import pytest

import ostinato
from ostinato import control
from ostinato.coordinators import Coordinator, Denied, Grant, LoopStats, Renewal, RunnerInfo
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.errors import CoordinatorUnavailable
from ostinato.loop import Pass
from tests.history import PassRecord, fences_only_grow, overlaps


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a deadline for a polled condition, not a cancel scope
    """Wait for ``condition`` to hold, failing the test if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


class Recorder:
    """Bodies call ``record`` so tests can check what ran, when and under which fence."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []
        self.lock = threading.Lock()

    def record(self, ctx: Pass, runner_tag: int, work: Callable[[], None] | None = None) -> None:
        start = time.monotonic()
        if work is not None:
            work()
        with self.lock:
            self.records.append(PassRecord(runner_tag, ctx.fence, start, time.monotonic()))


def two_runner_app(url: str, rec: Recorder, tag: int, **options: object) -> ostinato.App:
    app = ostinato.App("pair", coordinator=url, grace="5s")

    @app.loop(lease="3s", **options)  # type: ignore[call-overload]
    def work(ctx: Pass) -> None:
        rec.record(ctx, tag, lambda: time.sleep(0.002))

    return app


async def test_two_runners_never_overlap_and_graceful_stop_hands_over() -> None:
    """Of two runners, one runs the passes; stopping it hands the loop over with a new fence."""
    url, rec = memory_url(), Recorder()
    first, second = two_runner_app(url, rec, 1), two_runner_app(url, rec, 2)
    async with contextlib.AsyncExitStack() as holder:
        await holder.enter_async_context(first.running())
        await until(lambda: len(rec.records) > 20)
        async with second.running():
            count = len(rec.records)
            await until(lambda: len(rec.records) > count + 20)
            assert {r.pid for r in rec.records} == {1}  # the standby waits
            await holder.aclose()  # graceful stop of the holder, standby still running
            stopped_at = time.monotonic()
            await until(lambda: rec.records[-1].pid == 2)
    takeover = next(r for r in rec.records if r.pid == 2)
    assert takeover.start - stopped_at < 1.5  # a released lease is taken at once, not after its 3 s TTL
    assert overlaps(rec.records) == []
    assert fences_only_grow(rec.records)


async def test_sync_and_async_loops_run_side_by_side() -> None:
    """A slow sync loop does not hold up an async loop in the same runner."""
    app = ostinato.App("mix", coordinator=memory_url())
    seen = {"slow": 0, "fast": 0}
    release = threading.Event()

    @app.loop
    def slow(ctx: Pass) -> None:
        seen["slow"] += 1
        release.wait(5)

    @app.loop(pause="1ms")
    async def fast(ctx: Pass) -> None:
        seen["fast"] += 1

    async with app.running():
        await until(lambda: seen["fast"] > 50)
        assert seen["slow"] == 1
        release.set()


async def test_errors_back_off_and_never_end_the_loop() -> None:
    """A body that always raises keeps being called, and the errors are counted."""
    url = memory_url()
    app = ostinato.App("err", coordinator=url)
    calls = []

    @app.loop(error_backoff=("10ms", "20ms"))
    def broken(ctx: Pass) -> None:
        calls.append(time.monotonic())
        raise ValueError("always")

    async with app.running():
        await until(lambda: len(calls) >= 5)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.005  # backed off, not a hot loop
    records = await MemoryCoordinator(url.split("://")[1]).loops()
    [record] = records
    assert record.errors >= 5
    assert record.last_error == "ValueError: always"


async def test_idle_waits_until_woken() -> None:
    """After IDLE a loop backs off; app.wake ends the wait at once."""
    url = memory_url()
    app = ostinato.App("idle", coordinator=url)
    passes: list[float] = []

    @app.loop(idle=("30s", "30s"))
    def drain(ctx: Pass) -> object:
        passes.append(time.monotonic())
        return ostinato.IDLE

    async with app.running():
        await until(lambda: len(passes) == 1)
        await asyncio.sleep(0.1)
        assert len(passes) == 1  # in its 30 s idle wait
        await app.wake_async("drain")
        await until(lambda: len(passes) == 2, timeout=5.0)  # far short of the 30 s idle wait
        with pytest.raises(ostinato.UnknownLoopError):
            await app.wake_async("nope")


async def test_async_timeout_cancels_the_pass_and_the_loop_goes_on() -> None:
    """An async pass over its timeout is cancelled, counted as an error, and the next pass runs."""
    url = memory_url()
    app = ostinato.App("hang", coordinator=url)
    started = []

    @app.loop(timeout="50ms", error_backoff=("10ms", "10ms"))
    async def hangs(ctx: Pass) -> None:
        started.append(ctx.number)
        await asyncio.sleep(3600)

    async with app.running():
        await until(lambda: len(started) >= 3)
    [record] = await MemoryCoordinator(url.split("://")[1]).loops()
    assert record.errors >= 2
    assert "timeout" in (record.last_error or "")


async def test_pause_stops_passes_and_resume_starts_them() -> None:
    """Pause ends the holder's passes and no one takes the loop; resume brings it back."""
    url = memory_url()
    app = ostinato.App("pz", coordinator=url)
    passes: list[int] = []

    @app.loop(pause="1ms")
    def work(ctx: Pass) -> None:
        passes.append(ctx.fence)

    store = MemoryCoordinator(url.split("://")[1])
    async with app.running():
        await until(lambda: len(passes) > 5)
        await control.pause(store, "work")
        await until(lambda: store.store.leases["pz:work"].owner is None)
        count = len(passes)
        await asyncio.sleep(0.2)
        assert len(passes) <= count + 1  # at most the pass that was running
        [record] = await store.loops()
        assert record.state(time.time()) == "paused"
        await control.resume(store, "pz:work")
        await until(lambda: len(passes) > count + 5)
    assert passes[-1] > passes[0]


class Flaky(Coordinator):
    """A memory coordinator that can be made unreachable, as a network outage would."""

    def __init__(self, inner: Coordinator) -> None:
        self.inner = inner
        self.down = False
        self.display_url = "flaky://"

    def _check(self) -> None:
        if self.down:
            raise CoordinatorUnavailable("flaky: down")

    async def acquire(self, key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        self._check()
        return await self.inner.acquire(key, runner, ttl)

    async def renew(self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
                    ) -> dict[str, Renewal]:
        self._check()
        return await self.inner.renew(runner, leases)

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        self._check()
        return await self.inner.release(key, runner, fence)

    async def revoke(self, key: str) -> int | None:
        self._check()
        return await self.inner.revoke(key)

    async def forget(self, key: str) -> bool:
        self._check()
        return await self.inner.forget(key)

    async def report(self, runner: RunnerInfo, ttl: float, stats: Sequence[LoopStats]) -> None:
        self._check()
        await self.inner.report(runner, ttl, stats)

    async def runners(self):  # type: ignore[no-untyped-def]
        self._check()
        return await self.inner.runners()

    async def set_paused(self, key: str, paused: bool) -> None:
        self._check()
        await self.inner.set_paused(key, paused)

    async def loops(self):  # type: ignore[no-untyped-def]
        self._check()
        return await self.inner.loops()

    async def publish(self, event):  # type: ignore[no-untyped-def]
        self._check()
        await self.inner.publish(event)

    async def subscribe(self, runner, callback):  # type: ignore[no-untyped-def]
        await self.inner.subscribe(runner, callback)

    async def read_setting(self, name):  # type: ignore[no-untyped-def]
        self._check()
        return await self.inner.read_setting(name)

    async def write_setting(self, name, value, fence):  # type: ignore[no-untyped-def]
        self._check()
        return await self.inner.write_setting(name, value, fence)


async def test_unreachable_coordinator_stops_passes_at_once_and_they_resume_after() -> None:
    """A failed renewal stops new passes right away; when the coordinator is back, passes resume."""
    flaky = Flaky(MemoryCoordinator(uuid.uuid4().hex))
    app = ostinato.App("out", coordinator=flaky)
    fences: list[tuple[float, int]] = []

    @app.loop(lease="600ms", pause="1ms")
    def work(ctx: Pass) -> None:
        fences.append((time.monotonic(), ctx.fence))

    async with app.running() as runner:
        await until(lambda: len(fences) > 5)
        flaky.down = True
        await runner.renew_once()
        down_at = time.monotonic()
        await asyncio.sleep(0.3)
        assert [t for t, _ in fences if t > down_at] == []
        flaky.down = False
        await until(lambda: fences[-1][0] > down_at, timeout=5.0)
    assert fences[-1][1] > fences[0][1]


async def test_a_renewal_late_for_one_lease_still_renews_the_others() -> None:
    """A renewal answered after a short lease ran out loses that lease only: the loops with
    longer leases keep theirs (and their fences)."""
    flaky = Flaky(MemoryCoordinator(uuid.uuid4().hex))
    app = ostinato.App("late", coordinator=flaky)
    fences: dict[str, list[int]] = {"short": [], "long": []}

    @app.loop(lease="300ms", pause="1ms")
    def short(ctx: Pass) -> None:
        fences["short"].append(ctx.fence)

    @app.loop(lease="5s", pause="1ms")
    def long(ctx: Pass) -> None:
        fences["long"].append(ctx.fence)

    real_renew = flaky.renew

    async def late_renew(runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
                         ) -> dict[str, Renewal]:
        await asyncio.sleep(0.6)  # past the short lease, well inside the long one
        return await real_renew(runner, leases)

    async with app.running() as runner:
        await until(lambda: len(fences["short"]) > 5 and len(fences["long"]) > 5)
        keeper = runner.keepers["late:long"]
        losses = keeper.losses
        flaky.renew = late_renew  # type: ignore[method-assign]
        await runner.renew_once()
        flaky.renew = real_renew  # type: ignore[method-assign]
        assert keeper.losses == losses
        assert keeper.lease is not None
        assert keeper.lease.holds()
        count = len(fences["long"])
        await until(lambda: len(fences["long"]) > count + 5)
    assert set(fences["long"]) == {fences["long"][0]}  # never lost, so never granted again


async def test_renewals_keep_their_pace_when_each_takes_a_third_of_the_lease() -> None:
    """Renewals start a third of the lease apart however long each takes, so a coordinator
    whose round trip is a third of the lease still never lets the lease run out."""
    flaky = Flaky(MemoryCoordinator(uuid.uuid4().hex))
    app = ostinato.App("slow", coordinator=flaky)
    fences: list[int] = []

    @app.loop(lease="1s", pause="1ms")
    def work(ctx: Pass) -> None:
        fences.append(ctx.fence)

    real_renew = flaky.renew
    calls: list[float] = []

    async def slow_renew(runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
                         ) -> dict[str, Renewal]:
        calls.append(time.monotonic())
        await asyncio.sleep(0.35)
        return await real_renew(runner, leases)

    flaky.renew = slow_renew  # type: ignore[method-assign]
    async with app.running() as runner:
        await until(lambda: len(calls) >= 6, timeout=10.0)
        keeper = runner.keepers["slow:work"]
        assert keeper.losses == 0
    assert set(fences) == {fences[0]}  # never lost, so never granted again


async def test_a_lease_granted_late_in_its_life_is_renewed_at_once() -> None:
    """A grant whose request took most of the lease (a queue, two long round trips) is
    renewed as soon as it arrives. Here the grant comes 0.75 s into a 1 s lease, just
    after a regular renewal turn (runner start + 2/3 s) and well before the next
    (start + 1 s, past the lease): waiting for that turn would lose it every time."""
    flaky = Flaky(MemoryCoordinator(uuid.uuid4().hex))
    app = ostinato.App("slowgrant", coordinator=flaky)
    fences: list[int] = []

    @app.loop(lease="1s", pause="1ms")
    def work(ctx: Pass) -> None:
        fences.append(ctx.fence)

    real_acquire = flaky.acquire
    grants: list[float] = []

    async def slow_acquire(key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        await asyncio.sleep(0.75)
        answer = await real_acquire(key, runner, ttl)
        grants.append(time.monotonic())
        return answer

    flaky.acquire = slow_acquire  # type: ignore[method-assign]
    async with app.running() as runner:
        await until(lambda: bool(grants) and time.monotonic() > grants[0] + 1.5, timeout=10.0)
        keeper = runner.keepers["slowgrant:work"]
        assert keeper.losses == 0
        assert len(grants) == 1
    assert fences
    assert set(fences) == {fences[0]}  # never lost, so never granted again


async def test_running_stops_cleanly_and_releases() -> None:
    """Leaving ``running()`` finishes the pass, releases the lease and reports the stats."""
    url = memory_url()
    app = ostinato.App("bye", coordinator=url)
    count = [0]

    @app.loop(pause="1ms")
    def work(ctx: Pass) -> None:
        count[0] += 1

    async with app.running():
        await until(lambda: count[0] > 3)
    [record] = await MemoryCoordinator(url.split("://")[1]).loops()
    assert record.holder is None
    assert record.passes == count[0]


async def test_only_runs_the_named_loops() -> None:
    """``only=`` hosts just those loops; an unknown name is an error naming the known ones."""
    app = ostinato.App("only", coordinator=memory_url())
    ran: set[str] = set()

    @app.loop(pause="1ms")
    def a(ctx: Pass) -> None:
        ran.add("a")

    @app.loop(pause="1ms")
    def b(ctx: Pass) -> None:
        ran.add("b")

    async with app.running(only=["b"]):
        await until(lambda: "b" in ran)
    assert ran == {"b"}
    with pytest.raises(ostinato.UnknownLoopError, match="its loops are only:a, only:b"):
        async with app.running(only=["c"]):
            pass



async def test_sync_pass_over_its_timeout_is_reported_and_keeps_its_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync pass that overruns is logged as such while the runner keeps renewing its lease."""
    url = memory_url()
    app = ostinato.App("slow", coordinator=url)
    release = threading.Event()
    fences: list[int] = []

    @app.loop(timeout="50ms", lease="300ms")
    def stuck(ctx: Pass) -> None:
        fences.append(ctx.fence)
        release.wait(5)

    store = MemoryCoordinator(url.split("://")[1])
    async with app.running():
        await until(lambda: "over its timeout" in caplog.text)
        await asyncio.sleep(0.5)  # longer than the lease: only renewals keep it
        [record] = await store.loops()
        assert record.holder is not None
        assert record.fence == fences[0]
        release.set()
        await until(lambda: len(fences) > 1)
    assert fences[1] == fences[0]  # the same lease all along
    overruns = [r for r in caplog.records if "over its timeout" in r.getMessage()]
    assert overruns
    assert overruns[0].levelname == "ERROR"


async def test_a_loop_with_no_finished_pass_shows_as_stalled(caplog: pytest.LogCaptureFixture) -> None:
    """stall_after: status says stalled while no pass finishes, and the runner logs it and the recovery."""
    url = memory_url()
    app = ostinato.App("st", coordinator=url)
    release = threading.Event()

    @app.loop(stall_after="200ms", pause="10ms")
    def blocked(ctx: Pass) -> None:
        release.wait(5)

    store = MemoryCoordinator(url.split("://")[1])

    async def state() -> str:
        records = await store.loops()
        return records[0].state(time.time()) if records else "none"

    async with app.running():
        deadline = time.monotonic() + 5
        while await state() != "stalled":
            assert time.monotonic() < deadline, "never shown as stalled"
            await asyncio.sleep(0.02)
        await until(lambda: "stalled: no pass finished" in caplog.text)
        release.set()
        await until(lambda: "recovered from a stall" in caplog.text)
        deadline = time.monotonic() + 5
        while await state() == "stalled":
            assert time.monotonic() < deadline, "still stalled after passes resumed"
            await asyncio.sleep(0.02)
