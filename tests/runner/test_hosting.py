"""``app.running()`` inside a program: never held up by a slow or dead coordinator."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import ostinato
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.errors import ConfigurationError, CoordinatorUnavailable
from ostinato.loop import Pass
from tests.runner.test_runner import until


class Unreachable(MemoryCoordinator):
    """A coordinator that cannot be reached until ``up`` is set: each open fails at once,
    or (``hang``) only after a silent wait, as a connect to a server that never answers."""

    def __init__(self, *, hang: bool | str = False) -> None:
        super().__init__(uuid.uuid4().hex)
        self.up = asyncio.Event()
        self.hang = hang
        self.attempts = 0

    async def open(self) -> None:
        self.attempts += 1
        if self.up.is_set():
            return
        if self.hang:
            await asyncio.sleep(0.5 if self.hang is True else 3600)
        raise CoordinatorUnavailable("cannot reach the test's coordinator")


def counting_app(coordinator: MemoryCoordinator) -> tuple[ostinato.App, list[int]]:
    app = ostinato.App("hosted", coordinator=coordinator, grace="2s")
    passes: list[int] = []

    @app.loop(pause="10ms")
    def tick(ctx: Pass) -> None:
        passes.append(ctx.fence)

    return app, passes


@pytest.mark.parametrize("hang", [False, True])
async def test_the_block_is_entered_at_once_and_the_loops_start_once_connected(hang: bool) -> None:
    """A coordinator that refuses (or never answers) does not hold up the program: the
    block runs at once, and the loops start as soon as the coordinator can be reached."""
    coordinator = Unreachable(hang=hang)
    app, passes = counting_app(coordinator)
    async with asyncio.timeout(5):  # without it, a blocking running() would hang the test
        async with app.running() as runner:
            await until(lambda: coordinator.attempts >= (1 if hang else 2))
            assert not runner.connected.is_set()
            assert passes == []
            coordinator.up.set()
            await until(lambda: len(passes) >= 3, timeout=15)
            assert runner.connected.is_set()


@pytest.mark.parametrize("hang", [False, "forever"])
async def test_leaving_the_block_while_connecting_is_prompt(hang: bool | str) -> None:
    """Shutdown of the host program is not held up by a coordinator that never came."""
    coordinator = Unreachable(hang=hang)
    app, passes = counting_app(coordinator)
    async with asyncio.timeout(5):
        async with app.running() as runner:
            await until(lambda: coordinator.attempts >= 1)
    assert runner.ended.is_set()
    assert not runner.connected.is_set()
    assert passes == []


async def test_wait_enters_only_once_connected() -> None:
    """``wait=True``: the block starts with the coordinator connected."""
    coordinator = Unreachable()
    app, _ = counting_app(coordinator)
    asyncio.get_running_loop().call_later(0.3, coordinator.up.set)
    async with asyncio.timeout(10), app.running(wait=True) as runner:
        assert runner.connected.is_set()
        assert coordinator.attempts >= 2


async def test_wait_gives_up_after_its_limit() -> None:
    """``wait="300ms"`` raises a clear CoordinatorUnavailable, and stops retrying."""
    coordinator = Unreachable()
    app, _ = counting_app(coordinator)
    async with asyncio.timeout(5):
        with pytest.raises(CoordinatorUnavailable, match=r"could not be reached within 0\.3s"):
            async with app.running(wait="300ms"):
                pytest.fail("the block must not run")
    attempts = coordinator.attempts
    await asyncio.sleep(0.3)
    assert coordinator.attempts == attempts


async def test_a_wrong_setting_found_at_connect_ends_the_hosting_with_its_error() -> None:
    """A refusal that waiting cannot fix is kept in ``runner.error`` (and raised by wait=)."""

    class Refusing(MemoryCoordinator):
        async def open(self) -> None:
            raise ConfigurationError("no such database")

    app, _ = counting_app(Refusing(uuid.uuid4().hex))
    async with asyncio.timeout(5):
        async with app.running() as runner:
            await runner.ended.wait()
        assert isinstance(runner.error, ConfigurationError)
        with pytest.raises(ConfigurationError, match="no such database"):
            async with app.running(wait=True):
                pytest.fail("the block must not run")


async def test_a_loop_declared_after_the_app_started_is_refused() -> None:
    """A loop declared once the app is running would never run: say so instead."""
    app, _ = counting_app(MemoryCoordinator(uuid.uuid4().hex))
    async with app.running():
        with pytest.raises(ConfigurationError, match="already running, so loop 'late' would never run"):

            @app.loop
            def late(ctx: Pass) -> None: ...
