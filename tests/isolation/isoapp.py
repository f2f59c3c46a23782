"""Loops that hang, crash and leak, for the isolation tests; each pass records what it did.

Each pass appends ``<loop> <pid> <fence> <start_ns> <end_ns|-> <rss>`` lines to
``$OSTINATO_TEST_RECORDS/<loop>.log``: one line when it starts (end ``-``) and one
when it ends. ``pid`` is the process that ran the body (the child, when isolated).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import ostinato

RECORDS = os.environ.get("OSTINATO_TEST_RECORDS", "/tmp")
app = ostinato.App("iso", grace="3s")
_hoard: list[bytes] = []


def record(ctx: ostinato.Pass, start: int, end: int | None = None) -> None:
    line = f"{ctx.loop} {os.getpid()} {ctx.fence} {start} {end if end else '-'}\n"
    fd = os.open(f"{RECORDS}/{ctx.loop}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def hang_forever(ctx: ostinato.Pass) -> None:
    start = time.monotonic_ns()
    record(ctx, start)
    time.sleep(3600)


@app.loop(timeout="1s", lease="2s", error_backoff=("50ms", "50ms"))
def hang_thread(ctx: ostinato.Pass) -> None:
    """A sync body that never returns: it can only be reported, not stopped."""
    hang_forever(ctx)


@app.loop(timeout="1s", error_backoff=("50ms", "50ms"))
async def hang_async(ctx: ostinato.Pass) -> None:
    """An async body that never returns: cancelled at its timeout."""
    record(ctx, time.monotonic_ns())
    await asyncio.sleep(3600)


@app.loop(timeout="1s", isolation="process", error_backoff=("50ms", "50ms"))
def hang_process(ctx: ostinato.Pass) -> None:
    """A sync body that never returns, in a child process: killed at its timeout."""
    hang_forever(ctx)


@app.loop(isolation="process", pause="20ms", error_backoff=("50ms", "50ms"))
def segfault(ctx: ostinato.Pass) -> None:
    """Every second pass kills its own process with SIGSEGV."""
    start = time.monotonic_ns()
    record(ctx, start)
    if ctx.number % 2 == 0:
        os.kill(os.getpid(), signal.SIGSEGV)
    record(ctx, start, time.monotonic_ns())


@app.loop(isolation="process", pause="20ms", max_memory="120MB")
def leak(ctx: ostinato.Pass) -> None:
    """Keeps 50 MB more after every pass; max_memory recycles the child."""
    start = time.monotonic_ns()
    record(ctx, start)
    _hoard.append(os.urandom(1) * (50 * 2**20))
    record(ctx, start, time.monotonic_ns())


@app.loop(isolation="process", pause="20ms", max_passes=3)
def recycled(ctx: ostinato.Pass) -> None:
    """A fresh child every three passes."""
    start = time.monotonic_ns()
    record(ctx, start)
    record(ctx, start, time.monotonic_ns())
