"""``gc.freeze`` acts on the whole process: a runner of many loops uses it only when the
process is its own (``ostinato run``, ``app.run()``), never inside a host program."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Iterator

import pytest

import ostinato
from ostinato.leases import YOUNG_COLLECTED_AT
from ostinato.runner import FREEZE_FROM, Runner
from tests.runner.test_runner import until

LOOPS = FREEZE_FROM


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


async def idle(ctx: ostinato.Pass) -> object:
    return ostinato.IDLE


async def hold_all(freeze_gc: bool) -> tuple[int, int]:
    """Run a runner of ``LOOPS`` loops until it has held them all and renewed them once;
    return how many objects were frozen meanwhile, and the collector's first threshold."""
    app = ostinato.App("freeze", coordinator=f"memory://{uuid.uuid4().hex}")
    for i in range(LOOPS):
        app.loop(name=f"l{i}", lease="3s", idle=("1s", "30s"))(idle)
    runner = Runner(app.name, app.specs(None), app.connect(), grace=1.0, freeze_gc=freeze_gc)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await until(lambda: runner.renewals >= LOOPS, timeout=30)
        await asyncio.sleep(0.1)  # the round that renewed them all has decided
        return gc.get_freeze_count(), gc.get_threshold()[0]
    finally:
        stop.set()
        await task


async def test_a_runner_inside_a_host_program_never_freezes_its_objects() -> None:
    gc.set_threshold(700, 10, 10)
    assert await hold_all(freeze_gc=False) == (0, 700)


async def test_a_runner_that_owns_its_process_freezes_them_once_all_are_held() -> None:
    gc.set_threshold(700, 10, 10)
    frozen, young = await hold_all(freeze_gc=True)
    assert frozen > 0
    assert young == YOUNG_COLLECTED_AT  # and collects young objects less often


async def test_a_higher_threshold_set_by_the_program_stands() -> None:
    gc.set_threshold(50_000, 10, 10)
    assert (await hold_all(freeze_gc=True))[1] == 50_000
