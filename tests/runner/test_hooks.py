"""Hooks around passes: entered where the body runs, told how each pass ended."""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator

import ostinato
from ostinato import hooks
from ostinato.hooks import PassOutcome
from ostinato.loop import Pass
from tests.runner.test_runner import until

CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("current", default=None)


async def test_hooks_wrap_sync_and_async_passes_and_see_how_they_ended() -> None:
    seen: list[tuple[str, int, str | None, str | None]] = []
    inside: list[str | None] = []

    @contextlib.contextmanager
    def record(ctx: Pass) -> Iterator[PassOutcome]:
        token = CURRENT.set(ctx.lease_name)
        outcome = PassOutcome()
        error = None
        try:
            yield outcome
        except Exception as exc:
            error = type(exc).__name__
            raise
        finally:
            CURRENT.reset(token)
            seen.append((ctx.lease_name, ctx.number, outcome.outcome, error))

    app = ostinato.App("hooked", coordinator=f"memory://{uuid.uuid4().hex}", grace="1s")

    @app.loop(pause="1ms", error_backoff=("1ms", "2ms"))
    def sync_loop(ctx: Pass) -> object:
        inside.append(CURRENT.get())
        if ctx.number == 2:
            raise ValueError("two")
        return ostinato.IDLE if ctx.number == 3 else None

    @app.loop(pause="1ms")
    async def async_loop(ctx: Pass) -> None:
        inside.append(CURRENT.get())

    hooks.add_around_pass(record)
    try:
        async with app.running():
            await until(lambda: sum(1 for s in seen if s[1] >= 3) >= 2)
    finally:
        hooks.remove_around_pass(record)
    sync_seen = [s for s in seen if s[0] == "hooked:sync_loop"][:3]
    assert sync_seen == [("hooked:sync_loop", 1, "worked", None),
                         ("hooked:sync_loop", 2, None, "ValueError"),
                         ("hooked:sync_loop", 3, "idle", None)]
    assert ("hooked:async_loop", 1, "worked", None) in seen
    assert set(inside) == {"hooked:sync_loop", "hooked:async_loop"}  # set where the body runs
    assert record not in hooks.around_pass()
