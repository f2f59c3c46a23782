"""The rules of job-hosted loops, without a job system: links, generations, the keeper's verdict.

Links run here in this process against a ``memory://`` coordinator, and "enqueue" appends
to a list, so each rule is shown without workers or a broker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import multiprocessing
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

import ostinato
from ostinato.chains import Keeper
from ostinato.coordinators.protocol import LoopRecord, RunnerInfo
from ostinato.errors import ConfigurationError
from ostinato.forge import first_start, forge, overdue, watches_early, woken_start
from ostinato.links import JobOptions, Link, Tally, check_hostable, run_link
from ostinato.testing import FakeClock, MemoryCoordinator, MemoryStore

WORKER = RunnerInfo.here()
OPTIONS = JobOptions(budget=0.05)


def make_app(clock: FakeClock | None = None, **pacing: Any) -> tuple[ostinato.App, list[float]]:
    name = f"links{uuid.uuid4().hex[:6]}"
    store = MemoryCoordinator(store=MemoryStore(clock=clock)) if clock else f"memory://{name}"
    app = ostinato.App(name, coordinator=store)
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


def forged(app: ostinato.App, queue: Queue) -> Link | None:
    return asyncio.run(forge(app.connect(), WORKER, app, app.loops["tick"], queue, 1.0))


def seeded(app: ostinato.App, queue: Queue) -> Link:
    link = forged(app, queue)
    assert link is not None
    return link


def test_a_link_runs_passes_then_enqueues_exactly_one_next_link_with_its_fence() -> None:
    """A forged chain's link runs passes under the next fence and enqueues one link that
    names the fence of the lease it was handed, delayed by the loop's pause."""
    app, starts = make_app(pause="20ms")
    queue = Queue()
    first = seeded(app, queue)
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "ran"
    assert set(starts) == {first.parent + 1}
    [(nxt, delay)] = queue.links
    assert nxt.parent == first.parent + 2  # handed on: released and granted to the next owner
    assert nxt.owner != first.owner
    assert nxt.generation == first.generation
    assert 0 < delay <= 0.02


def test_the_lease_stays_held_between_links_so_a_second_forge_does_nothing() -> None:
    """Between two links the lease is held for the next one: status shows the loop held, and
    forging the chain again (a second seed) finds it held and enqueues nothing."""
    app, _ = make_app(pause="1s")
    queue = Queue()
    seeded(app, queue)
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "ran"
    [row] = app.status()
    assert row["holder"] == WORKER.label
    assert row["state"] == "running"
    assert forged(app, queue) is None
    assert len(queue.links) == 1


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


def test_two_copies_of_a_link_at_once_run_one_turn_and_enqueue_one_link() -> None:
    """The same message delivered twice at the same moment: one copy runs, the other ends
    without a pass and without enqueueing, and the chain goes on (one next link)."""
    app, starts = make_app()
    queue = Queue()
    seeded(app, queue)
    message = queue.pop()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(
            lambda _: run_link(app, message, queue, worker=WORKER, options=OPTIONS), range(2)))
    assert outcomes == ["ran", "stale"]
    assert len(set(starts)) == 1
    assert len(queue.links) == 1
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "ran"


def test_a_link_of_an_older_chain_ends_without_running() -> None:
    """A link so late that its lease ran out and the keeper re-forged the chain is stale."""
    clock = FakeClock()
    app, starts = make_app(clock)
    queue = Queue()
    seeded(app, queue)
    late = queue.pop()
    clock.advance(60)  # the lease held for the late link runs out
    seeded(app, queue)
    assert run_link(app, late, queue, worker=WORKER, options=OPTIONS) == "stale"
    assert starts == []
    assert len(queue.links) == 1
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "ran"
    assert starts
    assert len(queue.links) == 1


def test_a_link_whose_lease_another_runner_took_ends_without_running() -> None:
    """Revoked while the link waited (an operator's release) and taken by a runner: it ends."""
    app, starts = make_app()
    queue = Queue()
    seeded(app, queue)
    app.release("tick")

    async def take() -> None:
        await app.connect().acquire(f"{app.name}:tick", RunnerInfo.here(), 5.0)

    asyncio.run(take())
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "stale"
    assert starts == []
    assert queue.links == []


def test_a_paused_loop_ends_its_chain_and_the_keeper_leaves_it_alone() -> None:
    """A link of a paused loop ends without a next one and gives the lease back; the keeper
    does not forge while the loop is paused."""
    app, starts = make_app()
    queue = Queue()
    seeded(app, queue)
    app.pause("tick")
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=OPTIONS) == "paused"
    assert starts == []
    assert queue.links == []
    [row] = app.status()
    assert row["state"] == "paused"
    assert row["holder"] is None
    record = LoopRecord(f"{app.name}:tick", 3, True, None, None)
    assert not overdue(record, 1e9, patience=1.0, budget=1.0)


def test_the_keeper_forges_a_chain_at_start_and_again_once_it_is_overdue() -> None:
    """An elected keeper starts the chain of a loop never seen, and re-forges one whose link
    went missing once its planned start is ``patience`` behind."""
    app, _ = make_app(pause="10ms")
    queue = Queue()
    options = JobOptions(budget=0.05, patience=0.5)
    keeper = Keeper(app, "test", worker=WORKER, options=options, enqueue_link=queue)

    async def keep(seconds: float, until: str | None = None) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(keeper.run(stop))
        for _ in range(round(seconds / 0.01)):
            if until and keeper.counts[until]:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(keep(0.3))
    assert keeper.counts == {"forged": 1}
    assert len(queue.links) == 1
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=options) == "ran"
    queue.links.clear()  # the next link is lost
    lost = time.monotonic()
    asyncio.run(keep(3.0, until="reforged"))
    # Once the link is the patience late (not at once), and once only (its stand-in is not).
    assert 0.4 <= time.monotonic() - lost < 2.0
    assert keeper.counts["reforged"] == 1
    assert len(queue.links) == 1
    assert run_link(app, queue.pop(), queue, worker=WORKER, options=options) == "ran"


def test_overdue_waits_for_the_planned_start_plus_patience() -> None:
    """A free loop, or one handed on to a link that has not come, is overdue once its planned
    start is ``patience`` behind; one a link holds, once nothing happened for a link's budget
    plus ``patience``."""
    free = LoopRecord("a:b", 5, False, None, None, last_start=100.0, last_end=100.5, next_start=110.0)
    assert not overdue(free, 111.9, patience=2.0, budget=1.0)
    assert overdue(free, 112.1, patience=2.0, budget=1.0)
    handed = LoopRecord("a:b", 5, False, "h:1", 100.5, last_start=100.0, last_end=100.5, next_start=110.0)
    assert not overdue(handed, 111.9, patience=2.0, budget=1.0)
    assert overdue(handed, 112.1, patience=2.0, budget=1.0)
    held = LoopRecord("a:b", 5, False, "h:1", 200.0, last_start=200.1, last_end=None,
                      running_since=200.1)
    assert not overdue(held, 202.9, patience=2.0, budget=1.0)
    assert overdue(held, 203.2, patience=2.0, budget=1.0)
    assert overdue(None, 0.0, patience=2.0, budget=1.0)


def test_the_keeper_asks_early_only_for_a_lease_handed_on_to_a_link_not_yet_due() -> None:
    """A lease handed on to a link due later is asked for at once (a refusal on Redis starts
    the keeper's sighting of it); not when the link is about due (it may be taking the lease
    up), nor while a link runs, nor for a free or paused loop."""
    handed = LoopRecord("a:b", 5, False, "h:1", 100.5, last_start=100.0, last_end=100.5, next_start=110.0)
    assert watches_early(handed, 101.0)
    assert not watches_early(handed, 109.9)
    running = dataclasses.replace(handed, held_since=110.0, running_since=110.1)
    assert not watches_early(running, 101.0)
    assert not watches_early(dataclasses.replace(handed, holder=None), 101.0)
    assert not watches_early(dataclasses.replace(handed, paused=True), 101.0)
    assert not watches_early(None, 101.0)


def test_a_woken_chain_starts_at_its_pacing_without_the_idle_backoff() -> None:
    """A wake-up counts the pause from the last pass's end, ``every=`` from its start, and
    a back-to-back loop starts at once: the idle backoff the next link waited for is dropped."""
    record = LoopRecord("a:tick", 5, False, "h:1", 100.2, last_start=100.0, last_end=100.2,
                        next_start=105.2)
    for pacing, start in (({"pause": "1s"}, 101.2), ({"every": "2s"}, 102.0), ({}, 100.5)):
        app, _ = make_app(**pacing)
        assert woken_start(app.loops["tick"], record, 100.5, "a:tick") == (start, None)


def test_a_forged_chain_keeps_the_pause_its_last_link_planned() -> None:
    """A chain forged beside a live one starts no sooner than the old chain's next pass."""
    app, _ = make_app(pause="5s")
    record = LoopRecord("a:tick", 5, False, None, None, last_end=100.0, next_start=105.0)
    start, due = first_start(app.loops["tick"], record, 101.0, "a:tick")
    assert (start, due) == (105.0, None)


def _count_in_a_child(tally: Tally) -> None:
    tally.add("stale")
    tally.add("ran")


def test_a_tally_adds_up_what_processes_forked_from_its_maker_counted() -> None:
    """A worker's pool processes and work horses are forked from it: what they count shows
    in the worker's own tally."""
    tally = Tally()
    child = multiprocessing.get_context("fork").Process(target=_count_in_a_child, args=(tally,))
    child.start()
    child.join(10)
    tally.add("stale")
    counts = tally.counts()
    assert (counts["stale"], counts["ran"], counts["paused"]) == (2, 1, 0)


def test_job_metrics_show_links_by_outcome_and_chains_by_kind() -> None:
    """``ostinato_job_links`` and ``ostinato_chains_forged`` as Prometheus scrapes them."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from ostinato.metrics import JobsCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector("app", lambda: {"ran": 5, "stale": 2}, lambda: {"reforged": 1}))
    text = generate_latest(registry).decode()
    assert 'ostinato_job_links_total{app="app",outcome="stale"} 2.0' in text
    assert 'ostinato_chains_forged_total{app="app",kind="reforged"} 1.0' in text
    assert 'ostinato_chains_forged_total{app="app",kind="woken"} 0.0' in text


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


def test_the_core_imports_without_celery_and_rq_and_each_names_its_install() -> None:
    """Without celery and rq installed, ostinato imports, and each integration names its extra."""
    code = (
        "import sys\n"
        "sys.modules['celery'] = sys.modules['rq'] = None\n"
        "import ostinato, ostinato.links, ostinato.chains\n"
        "from ostinato import MissingExtraError\n"
        "for name in ('ostinato.celery', 'ostinato.rq'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except MissingExtraError as exc:\n"
        "        print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.splitlines() == [
        f"ostinato.{name} needs an optional dependency: run  pip install 'ostinato[{name}]'"
        for name in ("celery", "rq")
    ]


def test_a_keeper_whose_broker_fails_goes_on_and_forges_once_it_is_back() -> None:
    """An enqueue that raises (the broker is down) is logged and tried again later; the keeper
    itself never fails for it."""
    app, _ = make_app(pause="10ms")
    queue = Queue()
    down = [True]

    def enqueue(link: Link, delay: float) -> None:
        if down[0]:
            raise ConnectionError("broker down")
        queue(link, delay)

    keeper = Keeper(app, "test", worker=WORKER, options=JobOptions(budget=0.05, patience=0.2),
                    enqueue_link=enqueue)

    async def keep() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(keeper.run(stop))
        await asyncio.sleep(0.4)
        down[0] = False
        await asyncio.sleep(1.0)
        stop.set()
        await task

    asyncio.run(keep())
    assert queue.links  # forged again while no link ran, each one making the one before stale
    latest = queue.links[-1][0].encode()
    older = [link.encode() for link, _ in queue.links[:-1]]
    queue.links.clear()
    assert [run_link(app, m, queue, worker=WORKER, options=OPTIONS) for m in older] == ["stale"] * len(older)
    assert run_link(app, latest, queue, worker=WORKER, options=OPTIONS) == "ran"
