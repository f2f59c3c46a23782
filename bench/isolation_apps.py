"""Apps that ``bench/isolation.py`` hosts, one loop each, to time ``isolation="process"``.

They live at module level in a file of their own because an isolated loop's
child process imports the app again (``App.locate()`` names this file).

Every pass appends one 32-byte record -- pid, pass number, start and end, the
times as ``time.monotonic_ns()`` (end 0 when the pass never gets there) -- to
``$OSTINATO_BENCH_ISOLATION_RECORDS/<app>.rec`` with one unbuffered
``os.write``. The files are opened once per process, at import, so no pass pays
for an ``open``; ``O_APPEND`` keeps the records of the runner and of successive
children whole in one file. ``CLOCK_MONOTONIC`` is shared by all processes of a
host, so the runner and its children's records compare directly.

``noop_inprocess`` / ``noop_process``: a back-to-back no-op loop, in the runner's
thread and in a reused child process.
``hang_process`` / ``hang_async``: a pass that never returns (``time.sleep`` in a
child; ``await asyncio.sleep`` in the runner), ``timeout="200ms"``.
``crash_process``: a pass that records its start and then segfaults its child.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ostinato

#: The folder for the records (a tmpfs such as /dev/shm).
RECORDS_ENV = "OSTINATO_BENCH_ISOLATION_RECORDS"
#: One pass: pid, pass number, start, end (little-endian signed 64-bit; end 0 if none).
RECORD = struct.Struct("<qqqq")
#: The timeout of the hanging loops, in seconds.
HANG_TIMEOUT_S = 0.2
#: The error backoff bounds of the hanging and crashing loops.
ERROR_BACKOFF = ("10ms", "10ms")
#: A stopped benchmark's runner never waits long for the hanging passes.
GRACE = "2s"

#: The app attributes, which are also the names of their record files.
APPS = ("noop_inprocess", "noop_process", "hang_process", "hang_async", "crash_process")

_PR_SET_PDEATHSIG = 1


def records_path(folder: str | Path, app: str) -> Path:
    """Where the passes of app ``app`` (an attribute of this module) are recorded."""
    return Path(folder) / f"{app}.rec"


def _open_records() -> dict[str, int]:
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return {}
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return {app: os.open(records_path(folder, app), flags, 0o644) for app in APPS}


_FDS = _open_records()


def _fd(app: str) -> int:
    try:
        return _FDS[app]
    except KeyError:
        raise RuntimeError(f"set ${RECORDS_ENV} to a folder for the records") from None


def close_records() -> None:
    """Close this process's record files."""
    while _FDS:
        os.close(_FDS.popitem()[1])


def _die_with_parent() -> None:
    """Have the kernel kill this process when its parent goes (so a hung child never outlives
    a killed benchmark for an hour)."""
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name is not None:
        ctypes.CDLL(name).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# -- 1: a no-op pass, in the runner and in a child ---------------------------------------------------

noop_inprocess = ostinato.App("bench-iso-noop-inprocess", grace=GRACE)
noop_process = ostinato.App("bench-iso-noop-process", grace=GRACE)


def _noop_body(app: str) -> Callable[[ostinato.Pass], None]:
    fd, write, pack, now, pid = _fd(app), os.write, RECORD.pack, time.monotonic_ns, os.getpid()

    def noop(ctx: ostinato.Pass) -> None:
        start = now()
        end = now()
        write(fd, pack(pid, ctx.number, start, end))

    return noop


noop_inprocess.loop(name="noop")(_noop_body("noop_inprocess"))
noop_process.loop(name="noop", isolation="process")(_noop_body("noop_process"))


# -- 2: a pass that hangs past its timeout ---------------------------------------------------------------

hang_process = ostinato.App("bench-iso-hang-process", grace=GRACE)
hang_async = ostinato.App("bench-iso-hang-async", grace=GRACE)


@hang_process.loop(isolation="process", timeout=HANG_TIMEOUT_S, error_backoff=ERROR_BACKOFF)
def hang(ctx: ostinato.Pass) -> None:
    os.write(_fd("hang_process"), RECORD.pack(os.getpid(), ctx.number, time.monotonic_ns(), 0))
    _die_with_parent()
    time.sleep(3600)


@hang_async.loop(name="hang", timeout=HANG_TIMEOUT_S, error_backoff=ERROR_BACKOFF)
async def hang_async_body(ctx: ostinato.Pass) -> None:
    os.write(_fd("hang_async"), RECORD.pack(os.getpid(), ctx.number, time.monotonic_ns(), 0))
    await asyncio.sleep(3600)


# -- 3: a pass that crashes its child ----------------------------------------------------------------------

crash_process = ostinato.App("bench-iso-crash-process", grace=GRACE)


@crash_process.loop(isolation="process", error_backoff=ERROR_BACKOFF)
def crash(ctx: ostinato.Pass) -> None:
    os.write(_fd("crash_process"), RECORD.pack(os.getpid(), ctx.number, time.monotonic_ns(), 0))
    os.kill(os.getpid(), signal.SIGSEGV)
