"""The app the monitoring tests run in real runner processes.

``tick`` is a quick loop, ``flaky`` fails every third pass, and ``blocker``'s
body blocks for as long as the file ``$OSTINATO_TEST_GATE`` exists, so a test
can make it stall (``stall_after="1s"``) and recover at will.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ostinato

GATE = Path(os.environ.get("OSTINATO_TEST_GATE", "/nonexistent/ostinato-gate"))

app = ostinato.App("obs", grace="3s")


@app.loop(every="50ms", lease="3s")
def tick(ctx: ostinato.Pass) -> None:
    time.sleep(0.002)


@app.loop(pause="50ms", error_backoff=("50ms", "100ms"), lease="3s")
def flaky(ctx: ostinato.Pass) -> None:
    if ctx.number % 3 == 0:
        raise RuntimeError(f"flaky pass {ctx.number}")


@app.loop(pause="50ms", stall_after="1s", lease="3s")
def blocker(ctx: ostinato.Pass) -> None:
    while GATE.exists():
        time.sleep(0.01)
