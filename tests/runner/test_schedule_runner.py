"""Catch-up and jitter: the decisions from given times, then one runner after another end to end."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

import ostinato
from ostinato.loop import Pass
from ostinato.pacing import MISSED_LIMIT, Outcome, Pacing, Slot, jitter_delay, next_slot, plan_next
from tests.runner.test_runner import memory_url, until

BERLIN = ZoneInfo("Europe/Berlin")
KEY = "reports:nightly"


def wall(text: str, zone: ZoneInfo = BERLIN) -> float:
    """Wall-clock seconds of a local time in ``zone``."""
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def local(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, BERLIN).isoformat()


NIGHTLY = Pacing(cron="30 2 * * *", timezone="Europe/Berlin", catchup=6 * 3600.0)
HOURLY = Pacing(cron="0 * * * *", timezone="Europe/Berlin", catchup=3 * 3600.0)


# -- catch-up, from given times ---------------------------------------------------------------


def test_a_slot_missed_within_the_window_runs_once_at_once() -> None:
    """The nightly slot passed while no runner held the loop: it runs now, as a catch-up."""
    due = next_slot(NIGHTLY, wall_now=wall("2025-06-02T05:00"), last=wall("2025-06-01T02:30:04"))
    assert due == Slot(wall("2025-06-02T02:30"), wall("2025-06-02T05:00"), missed=1)


def test_missed_slots_are_coalesced_into_one_pass() -> None:
    """Three missed hourly slots are one pass standing for the latest, covering all three."""
    due = next_slot(HOURLY, wall_now=wall("2025-06-02T05:20"), last=wall("2025-06-02T02:00:01"))
    assert (local(due.at), due.start, due.missed) == (
        "2025-06-02T05:00:00+02:00", wall("2025-06-02T05:20"), 3,
    )


def test_nothing_older_than_the_window_is_caught_up() -> None:
    """After a day down, only the hourly slots of the last three hours count."""
    due = next_slot(HOURLY, wall_now=wall("2025-06-02T05:20"), last=wall("2025-06-01T02:00:01"))
    assert (local(due.at), due.missed) == ("2025-06-02T05:00:00+02:00", 3)
    old = next_slot(NIGHTLY, wall_now=wall("2025-06-02T09:00"), last=wall("2025-06-01T02:30:01"))
    assert (local(old.at), old.missed) == ("2025-06-03T02:30:00+02:00", 0)  # 02:30 is 6.5 h ago


def test_one_outage_gives_one_catch_up_pass() -> None:
    """After the catch-up pass, the next pass is the next slot on time, not another catch-up."""
    now = wall("2025-06-02T05:20")
    catch_up = next_slot(HOURLY, wall_now=now, last=wall("2025-06-02T02:00:01"))
    plan = plan_next(HOURLY, slot=100.0, end=130.0, wall_end=now + 30, outcome=Outcome.WORKED,
                     idle_streak=0, error_streak=0, due=catch_up)
    assert plan.due == Slot(wall("2025-06-02T06:00"), wall("2025-06-02T06:00"), missed=0)
    assert plan.start_at() == pytest.approx(130.0 + wall("2025-06-02T06:00") - (now + 30))


def test_a_pass_on_time_has_no_missed_slots() -> None:
    """When nothing was missed the next slot is ahead and counts none."""
    due = next_slot(HOURLY, wall_now=wall("2025-06-02T05:20"), last=wall("2025-06-02T05:00:01"))
    assert due == Slot(wall("2025-06-02T06:00"), wall("2025-06-02T06:00"), missed=0)


def test_without_catchup_missed_slots_are_skipped() -> None:
    """Off by default: after an outage the loop waits for its next slot."""
    pacing = Pacing(cron="30 2 * * *", timezone="Europe/Berlin")
    due = next_slot(pacing, wall_now=wall("2025-06-02T05:00"), last=wall("2025-06-01T02:30:04"))
    assert due == Slot(wall("2025-06-03T02:30"), wall("2025-06-03T02:30"), missed=0)


def test_a_loop_that_never_ran_catches_nothing_up() -> None:
    """With no recorded start there is no outage to make up for."""
    due = next_slot(NIGHTLY, wall_now=wall("2025-06-02T05:00"), last=None)
    assert due.missed == 0
    assert local(due.at) == "2025-06-03T02:30:00+02:00"


def test_catch_up_counts_slots_across_a_dst_night() -> None:
    """The spring-forward night's 02:30 is the 03:00 slot, and is caught up as such."""
    due = next_slot(NIGHTLY, wall_now=wall("2025-03-30T06:00"), last=wall("2025-03-29T02:30:02"))
    assert (local(due.at), due.missed) == ("2025-03-30T03:00:00+02:00", 1)


def test_a_dense_schedule_counts_missed_slots_up_to_the_limit() -> None:
    """Every second for six hours is counted up to ``MISSED_LIMIT`` and still stands for the
    latest slot."""
    pacing = Pacing(cron="* * * * * *", catchup=6 * 3600.0)
    now = 1_750_000_000.0
    started = time.monotonic()
    due = next_slot(pacing, wall_now=now + 0.5, last=now - 5 * 3600)
    assert time.monotonic() - started < 2.0
    assert (due.at, due.missed) == (now, MISSED_LIMIT)


# -- jitter, from given times -------------------------------------------------------------------


JITTERY = Pacing(cron="0 * * * *", timezone="Europe/Berlin", jitter=600.0)


def test_jitter_is_the_same_for_a_slot_on_every_call_and_spread_across_slots() -> None:
    """A slot's delay depends only on the lease name and the slot; it lies in [0, jitter)."""
    slots = [wall("2025-06-02T00:00") + 3600 * k for k in range(200)]
    delays = [jitter_delay(KEY, at, 600.0) for at in slots]
    assert delays == [jitter_delay(KEY, at, 600.0) for at in slots]
    assert all(0 <= d < 600 for d in delays)
    assert len({round(d, 3) for d in delays}) > 190
    assert min(delays) < 60
    assert max(delays) > 540
    assert jitter_delay("reports:other", slots[0], 600.0) != delays[0]
    assert jitter_delay(KEY, slots[0], 0.0) == 0.0


def test_a_hand_over_during_the_jitter_keeps_the_delay() -> None:
    """A runner taking the lease between a slot and its jittered start starts it at the same
    instant the previous holder would have, neither again nor later."""
    at = wall("2025-06-02T05:00")
    delay = jitter_delay(KEY, at, 600.0)
    before = next_slot(JITTERY, wall_now=at - 1, last=at - 3600 + 5, seed=KEY)
    assert before == Slot(at, at + delay)
    handed = next_slot(JITTERY, wall_now=at + delay / 2, last=at - 3600 + 5, seed=KEY)
    assert handed == before


def test_a_slot_already_started_is_not_run_again_by_the_next_holder() -> None:
    """The previous holder's recorded start is at or after its slot, so that slot is done."""
    at = wall("2025-06-02T05:00")
    start = at + jitter_delay(KEY, at, 600.0)
    due = next_slot(JITTERY, wall_now=start + 1, last=start, seed=KEY)
    assert due.at == at + 3600
    with_catchup = Pacing(cron="0 * * * *", timezone="Europe/Berlin", jitter=600.0, catchup=3600.0)
    again = next_slot(with_catchup, wall_now=start + 1, last=start, seed=KEY)
    assert (again.at, again.missed) == (at + 3600, 0)


def test_a_slot_whose_jittered_start_is_ahead_is_not_missed() -> None:
    """With catch-up on, a slot still waiting for its jitter is the next start, not a catch-up."""
    pacing = Pacing(cron="0 * * * *", timezone="Europe/Berlin", jitter=600.0, catchup=3600.0)
    at = wall("2025-06-02T05:00")
    delay = jitter_delay(KEY, at, 600.0)
    due = next_slot(pacing, wall_now=at + delay - 0.5, last=at - 3600 + 1, seed=KEY)
    assert due == Slot(at, at + delay, missed=0)


def test_loops_without_cron_have_no_slot() -> None:
    """every= and pause= passes stand for no slot; a hand-built Pass has none either."""
    assert Pacing(every=2.0).first(now=5.0, wall_now=1000.0, last_start_wall=999.0)[1] is None
    ctx = Pass("x")
    assert (ctx.scheduled_for, ctx.missed) == (None, 0)


# -- end to end on the memory coordinator -----------------------------------------------------


@dataclass(frozen=True)
class Run:
    tag: int
    scheduled_for: datetime
    missed: int
    started: float  # wall clock


class Book:
    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.lock = threading.Lock()

    def add(self, ctx: Pass, tag: int) -> None:
        started = time.time()
        assert ctx.scheduled_for is not None
        with self.lock:
            self.runs.append(Run(tag, ctx.scheduled_for, ctx.missed, started))

    def count(self, tag: int) -> int:
        with self.lock:
            return sum(1 for run in self.runs if run.tag == tag)


def every_second(url: str, book: Book, tag: int, **options: object) -> ostinato.App:
    app = ostinato.App("sched", coordinator=url, grace="5s")

    @app.loop(cron="* * * * * *", lease="2s", **options)  # type: ignore[call-overload]
    def tick(ctx: Pass) -> None:
        book.add(ctx, tag)

    return app


def covers_each_slot_once(runs: list[Run]) -> None:
    """Between consecutive passes lie exactly the slots the later one covers: none twice,
    none left out."""
    ordered = sorted(runs, key=lambda run: run.scheduled_for)
    for earlier, later in itertools.pairwise(ordered):
        gap = (later.scheduled_for - earlier.scheduled_for).total_seconds()
        assert gap == max(later.missed, 1), (earlier, later)


async def test_an_outage_is_made_up_by_one_coalesced_pass() -> None:
    """A loop down for about three seconds comes back with one catch-up pass covering exactly
    the slots it missed, then runs on time again."""
    url, book = memory_url(), Book()
    async with every_second(url, book, 1, catchup="1m").running():
        await until(lambda: book.count(1) >= 2)
    down_since = time.time()
    await asyncio.sleep(3.2)  # the outage: slots pass with no runner
    async with every_second(url, book, 2, catchup="1m").running():
        await until(lambda: book.count(2) >= 3)
    first, second = [run for run in book.runs if run.tag == 2][:2]
    assert first.missed >= 3
    assert first.started - first.scheduled_for.timestamp() < 1.0  # stands for the latest slot
    assert first.scheduled_for.timestamp() > down_since + 2
    assert second.missed == 0
    assert sum(1 for run in book.runs if run.missed) == 1
    assert first.scheduled_for.tzinfo is UTC
    covers_each_slot_once(book.runs)


async def test_a_hand_over_neither_repeats_a_slot_nor_rerolls_its_jitter() -> None:
    """Stopping the holder hands the loop to a standby: every slot runs once across both, each
    start delayed by its slot's own jitter on both runners."""
    url, book = memory_url(), Book()
    options = {"catchup": "1m", "jitter": "700ms"}
    async with contextlib.AsyncExitStack() as holder:
        await holder.enter_async_context(every_second(url, book, 1, **options).running())
        await until(lambda: book.count(1) >= 3)
        async with every_second(url, book, 2, **options).running():
            await holder.aclose()
            await until(lambda: book.count(2) >= 3)
    assert {run.tag for run in book.runs} == {1, 2}
    covers_each_slot_once(book.runs)
    for run in book.runs:
        slot = run.scheduled_for.timestamp()
        if not run.missed:
            late = run.started - (slot + jitter_delay("sched:tick", slot, 0.7))
            assert 0 <= late < 0.25, run


async def test_the_runner_reports_the_next_planned_start_and_its_zone() -> None:
    """Status learns each cron= and every= loop's next start (wall seconds) and its zone; an
    async cron= body gets its slot too."""
    app = ostinato.App("plans", coordinator=memory_url())
    seen: list[tuple[datetime | None, int]] = []

    @app.loop(cron="0 * * * *", timezone="Europe/Berlin")
    def hourly(ctx: Pass) -> None: ...

    @app.loop(every="1h")
    def rollup(ctx: Pass) -> None: ...

    @app.loop(cron="* * * * * *")
    async def ticking(ctx: Pass) -> None:
        seen.append((ctx.scheduled_for, ctx.missed))

    async with app.running() as runner:
        books = {name: runner.keepers[f"plans:{name}"].stats for name in ("hourly", "rollup")}
        await until(lambda: books["hourly"].next_start is not None and books["rollup"].passes == 1
                    and books["rollup"].next_start is not None and len(seen) >= 2)
        now = time.time()
        following = app.next_starts("hourly", count=1)[0].timestamp()
        assert books["hourly"].next_start == following
        assert books["hourly"].zone == "Europe/Berlin"
        assert books["rollup"].next_start == pytest.approx(now + 3600, abs=5)
        assert books["rollup"].zone is None
    slots = [slot for slot, _ in seen]
    assert all(slot is not None and slot.tzinfo is UTC for slot in slots)
    assert [missed for _, missed in seen] == [0] * len(seen)
