"""Loops made of members, hosted by several runners in one process, on every backend:
partitions spread, a key list that grows and shrinks, a rolling change of the partition count.

Every pass records (runner, fence, start, end) of the member it ran, and the checks are made
on those records: no two passes of one member at once, and, across a change of the count,
no two passes at once whose partitions cover a shard in common.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ostinato
from ostinato.families import Count, partitions_setting
from ostinato.loop import Pass
from ostinato.runner import Runner
from tests.contract.conftest import backend_url
from tests.history import PassRecord, fences_only_grow, overlaps
from tests.runner.test_runner import until


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.extended),
                        pytest.param("postgres", marks=pytest.mark.extended)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param in ("redis", "postgres"):
        request.applymarker(pytest.mark.backend)
    memory = request.param == "memory"
    made = f"memory://{uuid.uuid4().hex}" if memory else backend_url(request.param, tmp_path)
    yield made
    if request.param in ("redis", "postgres"):
        store = ostinato.App("cleanup", coordinator=made).connect()
        await store.open()
        await store.drop_everything()  # type: ignore[attr-defined]
        await store.close()


@dataclass(frozen=True)
class MemberPass:
    runner: int
    member: str
    count: int | None
    fence: int
    start: float
    end: float


class Book:
    """What every pass of every runner did."""

    def __init__(self) -> None:
        self.passes: list[MemberPass] = []

    def note(self, runner: int, ctx: Pass, start: float, member: str) -> None:
        self.passes.append(MemberPass(runner, member, ctx.partitions, ctx.fence, start, time.monotonic()))

    def by_member(self) -> dict[str, list[PassRecord]]:
        out: dict[str, list[PassRecord]] = {}
        for p in self.passes:
            out.setdefault(p.member, []).append(PassRecord(p.runner, p.fence, p.start, p.end))
        return out

    def since(self, moment: float) -> list[MemberPass]:
        return [p for p in self.passes if p.start >= moment]

    def check_single_flight(self) -> None:
        for member, records in self.by_member().items():
            assert overlaps(records) == [], member
            assert fences_only_grow(records), member


def partitioned(url: str, tag: int, book: Book, count: int, *, pause: str = "20ms",
                takes: float = 0.01) -> ostinato.App:
    app = ostinato.App("fam", coordinator=url)

    @app.loop(partitions=count, pause=pause, lease="2s")
    async def shard(ctx: Pass) -> None:
        start = time.monotonic()
        await asyncio.sleep(takes)
        book.note(tag, ctx, start, f"#{ctx.partition}")

    return app


def held_by(runners: list[Runner]) -> list[int]:
    return sorted(len(runner.held()) for runner in runners)


async def test_partitions_spread_across_three_runners_and_each_runs_one_at_a_time(url: str) -> None:
    book = Book()
    apps = [partitioned(url, tag, book, 8) for tag in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        runners = [await stack.enter_async_context(app.running(wait=True)) for app in apps]
        await until(lambda: held_by(runners) == [2, 3, 3], 30)
        started = time.monotonic()
        await until(lambda: {p.member for p in book.since(started)} == {f"#{i}" for i in range(8)}, 10)
        statuses = await apps[0].status_async()
    book.check_single_flight()
    assert {p.count for p in book.passes} == {8}
    assert sorted(row["member"] for row in statuses) == sorted(f"#{i}" for i in range(8))
    assert {row["family"] for row in statuses} == {"fam:shard"}


def keyed(url: str, tag: int, book: Book, source: Callable[[], Any], *, refresh: str = "300ms"
          ) -> ostinato.App:
    app = ostinato.App("fam", coordinator=url)

    @app.loop(keys=source, refresh=refresh, pause="20ms", lease="2s", fail_after=2)
    async def sync(ctx: Pass) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.005)
        assert ctx.key is not None
        book.note(tag, ctx, start, ctx.key)

    return app


async def test_a_key_list_that_grows_and_shrinks_starts_and_stops_its_loops(url: str) -> None:
    book = Book()
    keys = ["acme", "globex"]
    failing = [False]

    def source() -> list[str]:
        if failing[0]:
            raise ConnectionError("tenant database unreachable")
        return list(keys)

    apps = [keyed(url, tag, book, source) for tag in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app.running(wait=True))
        await until(lambda: {p.member for p in book.passes} == {"acme", "globex"}, 15)
        assert await apps[1].keys_async("sync") == ["acme", "globex"]

        keys[:] = ["globex", "initech"]
        changed = time.monotonic()
        # New keys start within refresh (0.3 s) plus a second.
        await until(lambda: any(p.member == "initech" for p in book.since(changed)), 1.3 + 2)
        first_new = min(p.start for p in book.passes if p.member == "initech")
        assert first_new - changed < 1.3 + 1.0
        # The removed key's holder finishes its pass and lets go: no pass starts after that.
        await asyncio.sleep(1.0)
        settled = time.monotonic()
        await asyncio.sleep(0.5)
        assert not [p for p in book.since(settled) if p.member == "acme"]
        rows = await apps[0].status_async()
        assert sorted(r["member"] for r in rows if r["member"]) == ["[globex]", "[initech]"]

        # A source that raises keeps the last good list and reads as a failing loop.
        failing[0] = True
        # (Whichever runner holds the loop that reads the key source says so.)
        await until(lambda: "failing" in {_state(app, "sync") for app in apps}, 15)
        await asyncio.sleep(0.5)
        assert await apps[0].keys_async("sync") == ["globex", "initech"]
        recent = time.monotonic()
        await until(lambda: {p.member for p in book.since(recent)} == {"globex", "initech"}, 5)
        failing[0] = False
        assert await apps[0].refresh_keys_async("sync", within="10s") == ["globex", "initech"]
    book.check_single_flight()


def _state(app: ostinato.App, name: str) -> str | None:
    """The state of ``name`` in ``app``'s hosted runner, as its keeper sees it."""
    runner = app._runner
    if runner is None:
        return None
    keeper = runner.keepers.get(f"{app.name}:{name}")
    if keeper is None:
        return None
    return "failing" if keeper.failing else "ok"


def covers_common_shard(a: MemberPass, b: MemberPass) -> bool:
    """Whether partitions ``a`` and ``b`` (each of its own count) share a shard: shard s
    belongs to partition s mod count, over the shards 0 .. lcm - 1."""
    assert a.count is not None
    assert b.count is not None
    pa, pb = int(a.member[1:]), int(b.member[1:])
    universe = a.count * b.count
    return any(s % a.count == pa and s % b.count == pb for s in range(universe))


def overlapping_work(passes: list[MemberPass]) -> list[tuple[MemberPass, MemberPass]]:
    found = []
    ordered = sorted(passes, key=lambda p: p.start)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.start >= a.end:
                break
            if a.count != b.count and covers_common_shard(a, b):
                found.append((a, b))
    return found


async def test_a_rolling_change_from_8_to_16_partitions_never_runs_overlapping_partitions(url: str) -> None:
    """Two runners run 8 partitions; two runners declaring 16 are started, one after the other,
    as a rolling deploy does, then the old two are stopped. Across it all, no pass under 8
    overlaps in time a pass under 16 whose partition shares a shard with it."""
    book = Book()
    # The old passes are long, so the change comes while most of them are mid-pass.
    old = [partitioned(url, tag, book, 8, pause="5ms", takes=0.3) for tag in (1, 2)]
    new = [partitioned(url, tag, book, 16, pause="5ms") for tag in (3, 4)]
    async with contextlib.AsyncExitStack() as olds:
        for app in old:
            await olds.enter_async_context(app.running(wait=True))
        await until(lambda: {p.member for p in book.passes} == {f"#{i}" for i in range(8)}, 20)
        async with contextlib.AsyncExitStack() as news:
            first = await news.enter_async_context(new[0].running(wait=True))
            await until(lambda: {p.member for p in book.passes if p.count == 16}
                        == {f"#{i}" for i in range(16)}, 30)
            changed = time.monotonic()
            second = await news.enter_async_context(new[1].running(wait=True))
            # The second new runner gets partitions from the first (balance hands them over).
            await until(lambda: len(second.held()) >= 2, 30)
            await asyncio.sleep(0.5)
            # The old runners, still up, run none of the partitions any more.
            assert not [p for p in book.since(changed) if p.count == 8]
            stored = await first.coordinator.read_setting(partitions_setting("fam:shard"))
            assert stored is not None
            force = Count.parse(stored.value)
            assert force is not None
            assert force.partitions == 16
            assert force.runner == first.info.id
            await olds.aclose()
            rows = await new[0].status_async()
    assert overlapping_work(book.passes) == []
    for member, records in book.by_member().items():
        # Within one count, one member at a time (a member name means other work under each count).
        for count in (8, 16):
            mine = [r for r, p in zip(records, [q for q in book.passes if q.member == member], strict=True)
                    if p.count == count]
            assert overlaps(mine) == [], (member, count)
    counts = Counter(p.count for p in book.passes)
    assert counts[8] > 0
    assert counts[16] > 0
    assert sorted(r["member"] for r in rows) == sorted(f"#{i}" for i in range(16))


async def test_metrics_label_each_member_with_its_loop() -> None:
    from ostinato.metrics import RunnerCollector

    book = Book()
    app = partitioned(f"memory://{uuid.uuid4().hex}", 1, book, 3)
    async with app.running(wait=True) as runner:
        await until(lambda: len(runner.held()) == 3, 10)
        samples = [s for metric in RunnerCollector(runner).collect() for s in metric.samples
                   if s.name == "ostinato_lease_held"]
    held = {(s.labels["loop"], s.labels["member"]): s.value for s in samples}
    assert held == {("shard", "#0"): 1.0, ("shard", "#1"): 1.0, ("shard", "#2"): 1.0}
