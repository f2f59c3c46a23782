"""What ``ostinato.hooks`` gives integrations besides the hooks around passes."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator

import ostinato
from ostinato import hooks
from ostinato.hooks import PassOutcome, RunnerEvent
from ostinato.loop import LoopSpec, Pass
from tests.runner.test_runner import until


async def test_runner_events_reach_listeners_and_hooks_see_the_loops_declaration() -> None:
    """Lease events reach a listener with loop and fence; a hook can read the loop's spec."""
    events: list[RunnerEvent] = []
    specs: list[LoopSpec | None] = []

    @contextlib.contextmanager
    def spy(ctx: Pass) -> Iterator[PassOutcome]:
        specs.append(hooks.declared(ctx))
        yield PassOutcome()

    app = ostinato.App("ev", coordinator=f"memory://{uuid.uuid4().hex}", grace="1s")

    @app.loop(pause="5ms", stall_after="7m")
    def tick(ctx: Pass) -> None:
        pass

    @app.loop(pause="5ms", timeout="3m")
    async def tock(ctx: Pass) -> None:
        pass

    hooks.add_runner_event(events.append)
    hooks.add_around_pass(spy)
    try:
        async with app.running():
            await until(lambda: len(specs) >= 4)
            app.release("tick")
            await until(lambda: sum(e.event == "lease_acquired" and e.loop == "ev:tick"
                                    for e in events) >= 2)
    finally:
        hooks.remove_around_pass(spy)
        hooks.remove_runner_event(events.append)
    acquired = next(e for e in events if e.event == "lease_acquired" and e.loop == "ev:tick")
    assert acquired.fence == 1
    assert acquired.runner == hooks.holder() == f"{socket.gethostname()}:{os.getpid()}"
    assert acquired.level == logging.INFO
    assert {spec.name: (spec.stall_after, spec.timeout) for spec in specs if spec} == {
        "tick": (420.0, None), "tock": (None, 180.0),
    }
    assert None not in specs
    assert hooks.declared(Pass("tick", app="ev")) is None  # outside a runner
    assert all(hooks._handler not in logging.getLogger(name).handlers for name in hooks._EVENT_LOGGERS)


def test_a_listener_does_not_give_the_ostinato_logger_a_handler() -> None:
    """Adding a listener leaves ``logging.getLogger('ostinato').hasHandlers()`` as it was."""
    logger = logging.getLogger("ostinato")
    before = logger.hasHandlers()
    hooks.add_runner_event(print)
    try:
        assert logger.hasHandlers() == before
    finally:
        hooks.remove_runner_event(print)
