"""``ostinato.testing.run_passes``: a loop body tested without a runner."""

from __future__ import annotations

import pytest

import ostinato
from ostinato.loop import Pass
from ostinato.testing import run_passes, run_passes_async


def shop() -> tuple[ostinato.App, list[Pass]]:
    app = ostinato.App("shop", coordinator="redis://127.0.0.1:1/0")  # never reached
    seen: list[Pass] = []
    inbox = [1, 2]

    @app.loop(every="1h")
    def drain(ctx: Pass) -> object:
        seen.append(ctx)
        if not inbox:
            return ostinato.IDLE
        item = inbox.pop()
        if item == 1:
            raise ValueError("bad item 1")
        return item

    @app.loop(pause="1h")
    async def check(ctx: Pass) -> str:
        seen.append(ctx)
        return "ok"

    return app, seen


def test_passes_run_at_once_and_report_each_outcome() -> None:
    """Three passes of an hourly loop run now: worked, failed (recorded, not raised), idle."""
    app, seen = shop()
    results = run_passes(app, "drain", 3)
    assert [r.outcome for r in results] == ["worked", "failed", "idle"]
    assert results[0].result == 2
    assert isinstance(results[1].error, ValueError)
    assert results[1].traceback is not None
    assert "bad item 1" in results[1].traceback
    assert results[2].result is ostinato.IDLE
    assert [ctx.number for ctx in seen] == [1, 2, 3]
    assert {ctx.fence for ctx in seen} == {results[0].fence}
    assert all(ctx.holds() for ctx in seen)
    assert seen[0].lease_name == "shop:drain"


def test_an_async_body_runs_too() -> None:
    app, seen = shop()
    (result,) = run_passes(app, "shop:check")
    assert (result.outcome, result.result) == ("worked", "ok")
    assert seen[0].app == "shop"


async def test_from_an_async_test() -> None:
    app, _ = shop()
    results = await run_passes_async(app, "check", 2)
    assert [r.result for r in results] == ["ok", "ok"]


def test_bad_calls_say_what_is_wrong() -> None:
    app, _ = shop()
    with pytest.raises(ostinato.UnknownLoopError, match="its loops are shop:drain, shop:check"):
        run_passes(app, "nope")
    with pytest.raises(ostinato.ConfigurationError, match="count must be at least 1"):
        run_passes(app, "drain", 0)
