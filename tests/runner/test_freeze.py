"""``gc.freeze`` acts on the whole process: a runner of many loops uses it only when the
process is its own (``ostinato run``, ``app.run()``), never inside a host program."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Iterator

import pytest

import ostinato
from ostinato.runner import FREEZE_FROM, Runner
from tests.runner.test_runner import until

LOOPS = FREEZE_FROM


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


async def idle(ctx: ostinato.Pass) -> object:
    return ostinato.IDLE


async def hold_all(freeze_gc: bool) -> int:
    """Run a runner of ``LOOPS`` loops until it has held them all and renewed them once;
    return how many objects were frozen meanwhile."""
    app = ostinato.App("freeze", coordinator=f"memory://{uuid.uuid4().hex}")
    for i in range(LOOPS):
        app.loop(name=f"l{i}", lease="3s", idle=("1s", "30s"))(idle)
    runner = Runner(app.name, app.specs(None), app.connect(), grace=1.0, freeze_gc=freeze_gc)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await until(lambda: runner.renewals >= LOOPS, timeout=30)
        await asyncio.sleep(0.1)  # the round that renewed them all has decided
        return gc.get_freeze_count()
    finally:
        stop.set()
        await task


async def test_a_runner_inside_a_host_program_never_freezes_its_objects() -> None:
    assert await hold_all(freeze_gc=False) == 0


async def test_a_runner_that_owns_its_process_freezes_them_once_all_are_held() -> None:
    assert await hold_all(freeze_gc=True) > 0
