"""Apps that ``bench/coordinators.py`` runs in ``ostinato run`` subprocesses.

``failover``: the loop of ``apps.failover`` (the very same body, ``apps.spin``:
one 32-byte record per pass, pid, fence, start and end, appended to
``$OSTINATO_BENCH_RECORDS/failover-<pid>.rec``), with its lease TTL read from
``$OSTINATO_BENCH_LEASE`` (default ``"10s"``, the library's default), so that
the Redis runs can use a shorter one.

``wake``: one loop with ``idle=("1h", "1h")`` whose sync body records its
pass in the same 32-byte format to ``$OSTINATO_BENCH_WAKE_RECORDS/wake-<pid>.rec``
and returns ``ostinato.IDLE``: after its first pass it runs again only when
woken. The file is opened once, at import, so a pass costs no ``open``.

Neither environment variable is set in the benchmark's own process, which
imports this module only for its names: there, nothing is opened.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from apps import RECORD, spin  # ``ostinato run`` puts this folder on sys.path

import ostinato

#: The failover loop's lease TTL (a duration string), default the library's "10s".
LEASE_ENV = "OSTINATO_BENCH_LEASE"
#: The folder for the wake records (a tmpfs such as /dev/shm).
WAKE_ENV = "OSTINATO_BENCH_WAKE_RECORDS"
WAKE_APP = "bench-wake"
WAKE_LOOP = "sleeper"

_PID = os.getpid()


def wake_records_path(folder: str | Path, pid: int) -> Path:
    """Where the runner with ``pid`` appends the records of its wake loop's passes."""
    return Path(folder) / f"wake-{pid}.rec"


def _open_wake_records() -> int | None:
    folder = os.environ.get(WAKE_ENV)
    if not folder:
        return None
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return os.open(wake_records_path(folder, _PID), flags, 0o644)


_WAKE_FD = _open_wake_records()

failover = ostinato.App("bench-failover")
failover.loop(name="spin", lease=os.environ.get(LEASE_ENV) or "10s")(spin)

wake = ostinato.App(WAKE_APP)


@wake.loop(name=WAKE_LOOP, idle=("1h", "1h"))
def sleeper(ctx: ostinato.Pass) -> object:
    """Record this pass (it started because the loop was acquired or woken), then go idle."""
    start = time.monotonic_ns()
    if _WAKE_FD is None:
        raise RuntimeError(f"set ${WAKE_ENV} to a folder for the wake records")
    os.write(_WAKE_FD, RECORD.pack(_PID, ctx.fence, start, time.monotonic_ns()))
    return ostinato.IDLE
