"""Apps that ``bench/core.py`` runs in ``ostinato run`` subprocesses.

``failover``: one back-to-back loop (default 10 s lease) whose sync body appends
one 32-byte record per pass -- pid, fence, start and end, times as
``time.monotonic_ns()`` -- to ``$OSTINATO_BENCH_RECORDS/failover-<pid>.rec``.
The file is opened once, at import, so a runner's first pass costs no ``open``.
``CLOCK_MONOTONIC`` is shared by the processes of one host, so the benchmark
can compare these times with the instant it sent ``kill -9``.

``idle`` and ``idle_async``: ``IDLE_LOOPS`` loops that find no work (return
``ostinato.IDLE``), with sync and ``async def`` bodies, to measure what a runner
costs while it has nothing to do.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import ostinato

#: The folder for the failover records (a tmpfs such as /dev/shm).
RECORDS_ENV = "OSTINATO_BENCH_RECORDS"
#: One failover pass: pid, fence, start, end (little-endian signed 64-bit).
RECORD = struct.Struct("<qqqq")
#: Loops in each idle app.
IDLE_LOOPS = 100

_PID = os.getpid()


def records_path(folder: str | Path, pid: int) -> Path:
    """Where the runner with ``pid`` appends its failover records."""
    return Path(folder) / f"failover-{pid}.rec"


def _open_records() -> int | None:
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return None
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return os.open(records_path(folder, _PID), flags, 0o644)


_FD = _open_records()

failover = ostinato.App("bench-failover")


@failover.loop
def spin(ctx: ostinato.Pass) -> None:
    """Record this pass: who ran it, under which fence, from when to when."""
    start = time.monotonic_ns()
    if _FD is None:
        raise RuntimeError(f"set ${RECORDS_ENV} to a folder for the failover records")
    end = time.monotonic_ns()
    os.write(_FD, RECORD.pack(_PID, ctx.fence, start, end))


idle = ostinato.App("bench-idle")
idle_async = ostinato.App("bench-idle-async")


def _nothing(ctx: ostinato.Pass) -> object:
    return ostinato.IDLE


async def _nothing_async(ctx: ostinato.Pass) -> object:
    return ostinato.IDLE


for _number in range(IDLE_LOOPS):
    idle.loop(name=f"idle-{_number:03d}")(_nothing)
    idle_async.loop(name=f"idle-{_number:03d}")(_nothing_async)
