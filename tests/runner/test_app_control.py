"""``app.pause/resume/release/status`` from Python, in the hosting process and from another."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import ostinato
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.loop import Pass
from tests.runner.test_runner import until


def apps(name: str) -> tuple[ostinato.App, ostinato.App, list[int]]:
    """The same app twice on one memory store: one hosts the loops, the other only controls."""
    url = f"memory://{uuid.uuid4().hex}"
    passes: list[int] = []
    made = []
    for _ in range(2):
        app = ostinato.App(name, coordinator=url, grace="2s")

        @app.loop(pause="5ms", lease="2s")
        def tick(ctx: Pass) -> None:
            passes.append(ctx.fence)

        made.append(app)
    return made[0], made[1], passes


async def test_pause_resume_release_and_status_from_python() -> None:
    """The async forms act on the loop whichever process calls them, and status shows it."""
    host, other, passes = apps("ctl")
    async with host.running():
        await until(lambda: len(passes) > 3)
        rows = await other.status_async()
        assert [(r["app"], r["loop"]) for r in rows] == [("ctl", "tick")]

        await other.pause_async("tick")
        await until_state(other, "paused")
        count = len(passes)
        await asyncio.sleep(0.1)
        assert len(passes) <= count + 1  # a pass running when the pause came may finish

        await host.resume_async("ctl:tick")
        await until(lambda: len(passes) > count + 3)

        fence = passes[-1]
        revoked = await other.release_async("tick")
        assert revoked == fence
        await until(lambda: passes[-1] > fence)


async def until_state(app: ostinato.App, state: str) -> None:
    for _ in range(500):
        if [r["state"] for r in await app.status_async()] == [state]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {state}: {await app.status_async()}")


def test_the_sync_forms_work_outside_an_event_loop() -> None:
    """``app.pause()`` and friends need no event loop of the caller's."""
    url = f"memory://{uuid.uuid4().hex}"
    app = ostinato.App("sync", coordinator=MemoryCoordinator(url.removeprefix("memory://")))

    @app.loop
    def tick(ctx: Pass) -> None: ...

    app.pause("tick")
    assert [(r["loop"], r["state"]) for r in app.status()] == [("tick", "paused")]
    app.resume("sync:tick")
    assert app.release("tick") is None


def test_an_unknown_loop_is_named_with_the_app_s_loops() -> None:
    app = ostinato.App("named")

    @app.loop
    def tick(ctx: Pass) -> None: ...

    with pytest.raises(ostinato.UnknownLoopError, match="no loop named 'tock'; its loops are named:tick"):
        app.pause("tock")
