"""A loop whose every pass fails reads as failing (and alerts once); balancing counts only
the runners that can run a loop."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import ostinato
from ostinato.loop import Pass
from ostinato.observe import unhealthy
from ostinato.runner import Stall
from tests.runner.test_runner import until


async def test_a_loop_failing_every_pass_is_failing_once_and_recovers_once() -> None:
    """After ``fail_after`` failed passes in a row: one ``failing`` notice, the ``failing``
    state in status and a failed health check; the first pass that works: one recovery."""
    url = f"memory://{uuid.uuid4().hex}"
    app = ostinato.App("f", coordinator=url, grace="2s")
    broken = [True]
    notices: list[Stall] = []
    app.on_stall(notices.append)

    @app.loop(pause="1ms", error_backoff=("1ms", "2ms"), fail_after=4)
    def flaky(ctx: Pass) -> None:
        if broken[0]:
            raise ValueError("the upstream said no")

    async with app.running() as runner:
        keeper = runner.keepers["f:flaky"]
        await until(lambda: any(n.reason == "failing" for n in notices), timeout=10)
        assert keeper.stats.fail_streak >= 4
        (notice,) = notices
        assert (notice.reason, notice.recovered, notice.loop) == ("failing", False, "f:flaky")
        assert notice.failed_passes >= 4  # seen as the fourth failure ended, or just after
        assert notice.last_error == "ValueError: the upstream said no"
        await until(lambda: keeper.stats.fail_streak > 20)  # it keeps failing: no second notice
        assert len(notices) == 1
        rows = await _status_until(app, "failing")
        assert rows[0]["fail_after"] == 4
        assert unhealthy(rows) == ["f:flaky is failing"]

        broken[0] = False
        await until(lambda: len(notices) == 2, timeout=10)
        assert notices[1].reason == "failing"
        assert notices[1].recovered
        rows = await _status_until(app, "running")
        assert rows[0]["fail_streak"] == 0


async def _status_until(app: ostinato.App, state: str) -> list[dict[str, object]]:
    """The app's status rows once its only loop reads ``state`` (reports come every second)."""
    for _ in range(500):
        rows = await app.status_async()
        if rows and rows[0]["state"] == state:
            return rows
        await asyncio.sleep(0.02)
    raise AssertionError(f"never {state}: {rows}")


async def test_an_async_pass_timing_out_every_time_is_failing_not_flapping() -> None:
    """A pass cancelled at its timeout ends no stall: the loop stalls once, then fails, and
    never reads as recovered while every pass keeps timing out."""
    url = f"memory://{uuid.uuid4().hex}"
    app = ostinato.App("t", coordinator=url, grace="2s")
    notices: list[Stall] = []
    app.on_stall(notices.append)
    ends: list[float] = []

    @app.loop(timeout="300ms", stall_after="150ms", error_backoff=("1ms", "2ms"), fail_after=3)
    async def hangs(ctx: Pass) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ends.append(asyncio.get_running_loop().time())

    async with app.running():
        await until(lambda: len(ends) >= 6, timeout=15)
    kinds = [(n.reason, n.recovered) for n in notices]
    assert kinds == [("stalled", False), ("failing", False)], kinds


def _app(name: str, url: str, loops: list[str]) -> ostinato.App:
    app = ostinato.App(name, coordinator=url, grace="1s")
    for loop in loops:

        def body(ctx: Pass) -> None:
            return None

        app.loop(name=loop, pause="20ms")(body)
    return app


async def _held_by(runners: list[object], keys: int) -> None:
    await until(lambda: sum(len(r.held()) for r in runners) == keys, timeout=10)  # type: ignore[attr-defined]


async def test_runners_of_another_app_are_not_counted_when_balancing() -> None:
    """A lone runner of app B beside three runners of app A keeps both its loops."""
    url = f"memory://{uuid.uuid4().hex}"
    async with contextlib.AsyncExitStack() as stack:
        others = [await stack.enter_async_context(_app("a", url, ["x", "y"]).running()) for _ in range(3)]
        lone = await stack.enter_async_context(_app("b", url, ["p", "q"]).running())
        await _held_by([lone], 2)
        await _held_by(others, 2)
        for runner in [*others, lone]:
            await runner._report()  # every heartbeat in, then a balance round
        await lone.balance()
        assert lone.live_runners == 1
        assert not any(k._handing_over for k in lone.keepers.values())
        assert len(lone.held()) == 2


async def test_a_runner_that_does_not_host_a_loop_does_not_count_for_it() -> None:
    """Runner 1 hosts p and q, runner 2 only p (``--only``): runner 1 may hand p over,
    never q, and holds both without handing anything over when that is its share."""
    url = f"memory://{uuid.uuid4().hex}"
    app1, app2 = _app("b", url, ["p", "q"]), _app("b", url, ["p", "q"])
    async with app1.running() as first:
        await _held_by([first], 2)
        async with app2.running(only=["q"]) as second:
            await first._report()
            await second._report()
            await first.balance()
            # q: only runner 1 can run it; p: both. Its share: 1 + 1/2, rounded up: 2.
            assert first.fair_share() == 2
            assert not any(k._handing_over for k in first.keepers.values())

    async with app1.running() as first:
        await _held_by([first], 2)
        async with app2.running() as second:  # both host both: one of them moves
            await first._report()
            await second._report()
            await first.balance()
            assert first.fair_share() == 1
            await until(lambda: len(first.held()) == 1 and len(second.held()) == 1, timeout=10)


async def test_a_runner_that_joins_is_handed_its_whole_share_in_one_round() -> None:
    """Runner 1 holds all 40 loops; runner 2 joins: one balancing round of runner 1 hands
    over all 20 beyond its share (not one a round), and runner 2 takes them."""
    url = f"memory://{uuid.uuid4().hex}"
    loops = [f"l{i}" for i in range(40)]
    async with _app("b", url, loops).running() as first:
        await _held_by([first], 40)
        async with _app("b", url, loops).running() as second:
            await first._report()
            await second._report()
            await first.balance()
            assert first.fair_share() == 20
            assert sum(k._handing_over for k in first.keepers.values()) == 20
            await until(lambda: (len(first.held()), len(second.held())) == (20, 20), timeout=10)


async def test_loops_split_to_within_one_across_runners_that_all_can_run_them() -> None:
    """Ten loops over three runners end 4, 3, 3, not 4, 4, 2 (the rounded-up share of each
    runner): each runner's share is exact, the one extra loop going to the first by id."""
    url = f"memory://{uuid.uuid4().hex}"
    loops = [f"l{i}" for i in range(10)]
    async with contextlib.AsyncExitStack() as stack:
        runners = []
        for _ in range(3):
            runners.append(await stack.enter_async_context(_app("e", url, loops).running()))
            await _held_by(runners, 10)
        await until(lambda: sorted(len(r.held()) for r in runners) == [3, 3, 4], timeout=15)
        assert sorted(r.fair_share() for r in runners) == [3, 3, 4]
        first = min(runners, key=lambda r: r.info.id)
        assert first.fair_share() == 4
