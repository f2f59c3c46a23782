"""Standbys wait quietly while the runner holding their lease is active, and take over once
it falls silent (``ostinato.standbys``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import ostinato
from ostinato import standbys
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.coordinators.protocol import Event, RunnerInfo
from ostinato.errors import CoordinatorUnavailable
from ostinato.keeper import LoopKeeper
from ostinato.loop import Pass
from ostinato.runner import Runner
from ostinato.standbys import rank
from tests.runner.test_runner import until

LOOPS = 40


def _app(url: str) -> ostinato.App:
    app = ostinato.App("q", coordinator=url, grace="1s")
    for i in range(LOOPS):

        def body(ctx: Pass) -> None:
            return None

        app.loop(name=f"l{i}", pause="50ms", lease="1s")(body)
    return app


@contextlib.contextmanager
def _counted_asks() -> Iterator[collections.Counter[str]]:
    """Lease requests made through any memory coordinator, by the asking runner's id."""
    asks: collections.Counter[str] = collections.Counter()
    original = MemoryCoordinator.acquire

    async def counting(self: MemoryCoordinator, key: str, runner: RunnerInfo, ttl: float) -> Any:
        asks[runner.id] += 1
        return await original(self, key, runner, ttl)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MemoryCoordinator, "acquire", counting)
        yield asks


def _cut_off(runner: Runner) -> None:
    """The runner can no longer reach its coordinator, and the leases it holds stay
    claimed until they expire: as a runner cut off by the network, or killed."""

    async def unreachable(*args: object, **kwargs: object) -> Any:
        raise CoordinatorUnavailable("cut off by the test")

    for name in ("acquire", "acquire_many", "renew", "release_many", "report", "runners",
                 "silence", "publish_many"):
        setattr(runner.coordinator, name, unreachable)


async def test_standbys_stay_quiet_while_the_holder_is_active_and_take_over_once_it_is_silent() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    with _counted_asks() as asks:
        async with _app(url).running() as first, _app(url).running() as second:
            await until(lambda: len(first.held()) + len(second.held()) == LOOPS, timeout=10)
            await until(lambda: first.standbys.counted and second.standbys.counted, timeout=5)
            await until(lambda: abs(len(first.held()) - len(second.held())) <= 1, timeout=15)
            # Every loop held by one runner and waited for quietly by the other.
            await until(lambda: all(len(r.held()) + r.standbys.quiet == LOOPS for r in (first, second)))
            # A quiet standby has no task of its own: each loop has one task, its holder's.
            names = collections.Counter(task.get_name() for task in asyncio.all_tasks())
            assert {key: names[key] for key in first.keepers} == dict.fromkeys(first.keepers, 1)
            # Three TTLs of steady state: a standby that asked every third of its TTL would
            # have asked about 9 times, 360 requests in all.
            before = dict(asks)
            await asyncio.sleep(3.0)
            quiet = sum(asks.values()) - sum(before.values())
            assert quiet <= 4, f"{quiet} lease requests from standbys of active owners"
            assert abs(len(first.held()) - len(second.held())) <= 1  # nothing changed hands

            # Events may have been missed (the events connection came back): every quiet
            # standby of that runner asks once, then waits quietly again.
            quiet, before = second.standbys.quiet, sum(asks.values())
            second._on_event(Event("missed", ""))
            await until(lambda: sum(asks.values()) - before >= quiet)
            await until(lambda: second.standbys.quiet == quiet)

            _cut_off(first)
            # Woken by the silence of the owner (after the 1 s TTL), not by their patience
            # (15 s at the soonest).
            await until(lambda: len(second.held()) == LOOPS, timeout=8)


async def test_a_runner_joining_a_busy_fleet_starts_no_task_for_a_loop_it_does_not_get() -> None:
    """The runner asks for every loop's lease in batches, with no task per loop: a loop gets a
    task only once granted (or to wait out a refusal on its own), and a standby of an active
    owner is parked straight from the answer."""
    url = f"memory://{uuid.uuid4().hex}"
    started: collections.Counter[tuple[str, str]] = collections.Counter()
    original = LoopKeeper.keep

    async def counting(self: LoopKeeper, answer: Any = None, **kwargs: Any) -> None:
        started[self.runner.info.id, type(answer).__name__] += 1
        await original(self, answer, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LoopKeeper, "keep", counting)
        async with _app(url).running() as first:
            await until(lambda: len(first.held()) == LOOPS, timeout=10)
            async with _app(url).running() as second:
                await until(lambda: abs(len(first.held()) - len(second.held())) <= 1, timeout=15)
                await until(lambda: len(second.held()) + second.standbys.quiet == LOOPS)
                theirs = {kind: n for (runner, kind), n in started.items() if runner == second.info.id}
                # Every task the newcomer started, it started with a grant in hand.
                assert theirs == {"Grant": len(second.held())}, theirs


def _late(runner: Runner, lag: float) -> None:
    """The runner sees each owner's silence ``lag`` seconds late, as a runner that came to
    stand by late (busy, or waiting for balance) first sees the owner's count late."""
    silence = runner.coordinator.silence

    async def late(owners: list[str]) -> dict[str, float] | None:
        found = await silence(owners)
        return None if found is None else {owner: silent - lag for owner, silent in found.items()}

    runner.coordinator.silence = late  # type: ignore[method-assign]


async def _orphans_taken(within: float, lag: float = 0.0) -> tuple[set[str], dict[str, set[str]]]:
    """Three runners split the loops; one is cut off, and the third sees owners' silence
    ``lag`` late. The cut-off runner's loops, and the loops each of the two others (by id)
    holds once they hold all of those, within ``within`` seconds of the cut."""
    url = f"memory://{uuid.uuid4().hex}"
    async with _app(url).running() as first, _app(url).running() as second, \
            _app(url).running() as third:
        _late(third, lag)
        runners = (first, second, third)
        await until(lambda: sum(len(r.held()) for r in runners) == LOOPS, timeout=10)
        await until(lambda: all(r.standbys.counted and r.live_runners == 3 for r in runners), timeout=10)
        await until(lambda: all(abs(len(r.held()) - LOOPS / 3) <= 1 for r in runners), timeout=15)
        orphans = {keeper.key for keeper in first.held()}
        _cut_off(first)
        await until(lambda: {k.key for k in second.held()} | {k.key for k in third.held()} >= orphans,
                    timeout=within)
        return orphans, {r.info.id: {k.key for k in r.held()} for r in (second, third)}


async def test_a_silent_owners_loops_go_first_to_the_runner_ranked_first_for_each() -> None:
    """Once many standbys wait on a silent owner, the runner ranked first for each of its loops
    asks at once and the others a step later each: every loop is taken by its first-ranked
    runner, where all asking at once left each to whoever asked first."""
    with pytest.MonkeyPatch.context() as patch:
        # Steps long against the standbys' looks (a tenth of the 1 s lease): the order holds
        # whatever the runners' clocks of the owner's silence differ by. Ranked however few
        # standbys wait.
        patch.setattr(standbys, "RANK_STEP", (2.0, 0.6))
        patch.setattr(standbys, "RANKED_FROM", 0)
        orphans, held = await _orphans_taken(within=10)
    (one, theirs), (other, _) = held.items()
    for key in orphans:
        holder, rival = (one, other) if key in theirs else (other, one)
        assert rank(key, holder, [rival]) == 0, key
    # Both took some: the order spreads the loops.
    assert all(orphans & keys for keys in held.values())


async def test_a_few_standbys_of_a_silent_owner_ask_at_once_whatever_their_rank() -> None:
    """Where few standbys wait on a silent owner, none waits for its rank: the survivor that
    sees the owner silent first takes all of its loops. Ranked, the loops ranked first for
    the survivor that sees the silence 5 s late would wait 5 s (late, or a step of 5 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(standbys, "RANK_STEP", (5.0, 5.0))
        assert LOOPS < standbys.RANKED_FROM
        orphans, held = await _orphans_taken(within=4, lag=5.0)
    assert orphans
    assert orphans <= set().union(*held.values())


def test_rank_orders_every_key_the_same_way_on_every_runner_and_spreads_them() -> None:
    ids = [f"runner-{n}" for n in range(9)]
    firsts = collections.Counter()
    for n in range(10_000):
        key = f"app:loop[{n}]"
        ranks = sorted(rank(key, me, [other for other in ids if other != me]) for me in ids)
        assert ranks == list(range(9)), key
        firsts[next(me for me in ids if rank(key, me, [o for o in ids if o != me]) == 0)] += 1
    assert all(abs(count - 10_000 / 9) < 150 for count in firsts.values()), firsts
