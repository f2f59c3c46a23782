"""The rules of job-hosted loops, without a job system: links, generations, the keeper's verdict.

Links run here in this process against a ``memory://`` coordinator, and "enqueue" appends
to a list, so each rule is shown without workers or a broker.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

import ostinato
from ostinato.chains import Keeper, first_start, forge, overdue
from ostinato.coordinators.protocol import LoopRecord, RunnerInfo
from ostinato.errors import ConfigurationError
from ostinato.links import JobOptions, Link, check_hostable, run_link

WORKER = RunnerInfo.here()
OPTIONS = JobOptions(budget=0.05)


def make_app(**pacing: Any) -> tuple[ostinato.App, list[float]]:
    app = ostinato.App(f"links{uuid.uuid4().hex[:6]}", coordinator=f"memory://{uuid.uuid4().hex}")
    starts: list[float] = []

    @app.loop(lease="2s", **pacing)
    def tick(ctx: ostinato.Pass) -> None:
        starts.append(ctx.fence)

    return app, starts


class Queue:
    """What a job system would carry: the links enqueued, with their delays."""

    def __init__(self) -> None:
        self.links: list[tuple[Link, float]] = []

    def __call__(self, link: Link, delay: float) -> None:
        self.links.append((link, delay))

    def pop(self) -> dict[str, Any]:
        link, _ = self.links.pop(0)
        return link.encode()


def seeded(app: ostinato.App, queue: Queue) -> Link:
    async def go() -> Link:
        store = app.connect()
        link = await forge(store, WORKER, app.name, app.loops["tick"], queue)
        assert link is not None
        return link

    return asyncio.run(go())


def test_a_link_runs_passes_then_enqueues_exactly_one_next_link_with_its_fence() -> None:
    """A forged chain's link runs passes under the next fence and enqueues one link that
    names that fence as its parent, delayed by the loop's pause."""
    app, starts = make_app(pause="20ms")
    queue = Queue()
    forged = seeded(app, queue)
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "ran"
    assert starts
    assert set(starts) == {forged.parent + 1}
    [(nxt, delay)] = queue.links
    assert nxt.parent == forged.parent + 1
    assert nxt.generation == forged.generation
    assert 0 < delay <= 0.02


def test_a_link_delivered_twice_runs_once_and_the_copy_enqueues_nothing() -> None:
    """The same message delivered again after its link ran is stale: no pass, no next link."""
    app, starts = make_app()
    queue = Queue()
    seeded(app, queue)
    message = queue.pop()
    assert run_link(app, message, queue, worker=WORKER, options=OPTIONS) == "ran"
    ran, enqueued = len(starts), len(queue.links)
    assert run_link(app, message, queue, worker=WORKER, options=OPTIONS) == "stale"
    assert (len(starts), len(queue.links)) == (ran, enqueued)


def test_a_second_forge_leaves_the_first_chain_stale() -> None:
    """Two chains forged one after the other: only the newer one's link runs."""
    app, _ = make_app()
    queue = Queue()
    seeded(app, queue)
    seeded(app, queue)
    older, newer = queue.pop(), queue.pop()
    assert run_link(app, older, queue, worker=WORKER, options=OPTIONS) == "stale"
    assert queue.links == []
    assert run_link(app, newer, queue, worker=WORKER, options=OPTIONS) == "ran"
    assert len(queue.links) == 1


def test_a_link_finding_the_lease_held_ends_without_running() -> None:
    """While someone else holds the loop (a runner, a link of another chain), a link ends."""
    app, starts = make_app()
    queue = Queue()
    link = seeded(app, queue)
    other = RunnerInfo.here()

    async def hold() -> None:
        await app.connect().acquire(f"{app.name}:tick", other, 5.0)

    asyncio.run(hold())
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) in ("stale", "held")
    assert starts == []
    assert queue.links == []
    assert link.parent > 0


def test_a_paused_loop_ends_its_chain_and_the_keeper_leaves_it_alone() -> None:
    """A link of a paused loop ends without a next one; the keeper does not forge while paused."""
    app, starts = make_app()
    queue = Queue()
    seeded(app, queue)
    app.pause("tick")
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "paused"
    assert starts == []
    assert queue.links == []
    record = LoopRecord(f"{app.name}:tick", 3, True, None, None)
    assert not overdue(record, 1e9, patience=1.0, budget=1.0)


def test_the_keeper_forges_a_chain_at_start_and_again_once_it_is_overdue() -> None:
    """An elected keeper starts the chain of a loop never seen, and re-forges one whose link
    went missing once its planned start is ``patience`` behind."""
    app, _ = make_app(pause="10ms")
    queue = Queue()
    keeper = Keeper(app, "test", worker=WORKER, options=JobOptions(budget=0.05, patience=0.5),
                    enqueue_link=queue)

    async def keep(seconds: float) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(keeper.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await task

    asyncio.run(keep(0.3))
    assert keeper.counts == {"forged": 1}
    assert len(queue.links) == 1
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "ran"
    queue.links.clear()  # the next link is lost
    asyncio.run(keep(1.2))
    assert keeper.counts["reforged"] >= 1
    assert len(queue.links) >= 1
    assert run_link(app, queue.links[-1][0].encode(), queue, worker=WORKER, options=OPTIONS) == "ran"


def test_overdue_waits_for_the_planned_start_plus_patience() -> None:
    """A free loop is overdue only once its planned start, last start and last end are all
    more than ``patience`` ago; a held one only once it has held longer than a link runs."""
    free = LoopRecord("a:b", 5, False, None, None, last_start=100.0, last_end=100.5, next_start=110.0)
    assert not overdue(free, 111.9, patience=2.0, budget=1.0)
    assert overdue(free, 112.1, patience=2.0, budget=1.0)
    held = LoopRecord("a:b", 5, False, "h:1", 200.0, last_start=200.1, last_end=None)
    assert not overdue(held, 202.9, patience=2.0, budget=1.0)
    assert overdue(held, 203.2, patience=2.0, budget=1.0)
    assert overdue(None, 0.0, patience=2.0, budget=1.0)


def test_a_forged_chain_keeps_the_pause_its_last_link_planned() -> None:
    """A chain forged beside a live one starts no sooner than the old chain's next pass."""
    app, _ = make_app(pause="5s")
    record = LoopRecord("a:tick", 5, False, None, None, last_end=100.0, next_start=105.0)
    start, due = first_start(app.loops["tick"], record, 101.0, "a:tick")
    assert (start, due) == (105.0, None)


def test_a_coordinator_object_other_than_memory_is_refused_with_what_to_do() -> None:
    """Jobs open connections of their own, so the coordinator must be given as a URL."""

    pytest.importorskip("redis")
    from ostinato.coordinators.redis import RedisCoordinator

    app = ostinato.App("objs", coordinator=RedisCoordinator("redis://127.0.0.1:1/0"))
    with pytest.raises(ConfigurationError, match="give the coordinator as a URL"):
        check_hostable(app, "chain")


def test_process_isolation_and_clock_mode_without_a_schedule_are_refused() -> None:
    """Loops a job cannot host are refused when attached, naming the loop and what to do."""
    app = ostinato.App("refused", coordinator="memory://refused")

    @app.loop(isolation="process")
    def apart(ctx: ostinato.Pass) -> None: ...

    with pytest.raises(ConfigurationError, match="refused:apart has isolation='process'"):
        check_hostable(app, "chain")
    paced, _ = make_app(pause="1s")
    with pytest.raises(ConfigurationError, match="give it every= or cron="):
        check_hostable(paced, "clock")
