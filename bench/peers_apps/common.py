"""What the arrangements share: the one pass they all run, and the settings the benchmark reports.

:func:`run_pass` records the pass, runs the body and records it again.

Each pass appends two 24-byte records (pid, start, end as ``time.monotonic_ns()``,
little-endian signed 64-bit) to ``$PEERS_RECORDS``: ``(pid, start, 0)`` as it
starts and ``(pid, start, end)`` as it ends, so a pass that was killed midway
shows as a start without an end. The file is opened once per process, at import,
with ``O_APPEND`` (one ``write`` of 24 bytes is atomic on a tmpfs), and a forked
child (an RQ work horse, a Celery pool process) inherits it.
``CLOCK_MONOTONIC`` is shared by the processes of one host, so the benchmark can
compare these times with the instant it sent ``kill -9``.

``$PEERS_BODY`` picks the body: ``noop`` (returns at once), ``sleep50``
(``time.sleep(0.05)``) or ``idle`` (finds no work: returns at once, and
:func:`run_pass` returns False so the arrangement can back off its own way).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

RECORDS_ENV = "PEERS_RECORDS"
BODY_ENV = "PEERS_BODY"
REDIS_ENV = "PEERS_REDIS"  # the Redis URL of the peers that use one
KEY_ENV = "PEERS_KEY"  # a name unique to one run: queue, lock or lease key
RECORD = struct.Struct("<qqq")
SLEEP_S = 0.05

#: What a plain loop sleeps after a pass that found no work (the article's 250 ms / 1 s / 5 s).
IDLE_SLEEP_S = 1.0
#: The Celery clock's period: ``celery beat`` enqueues the task this often.
CLOCK_PERIOD_S = 1.0
#: The Celery task's lock expiry, and the plain loop's lease: ostinato's default lease of 10 s,
#: so a dead holder's claim frees as late on every side.
LOCK_TTL_MS = 10_000
#: How often a plain loop that does not hold the lease asks for it again.
STANDBY_POLL_S = 0.1
#: APScheduler's interval trigger, unless ``$PEERS_APS_INTERVAL`` (seconds) says otherwise: 1 ms.
#: It accepts down to 1 us, but its rate peaks near 0.1 ms (about 6,000 fires/s here) and
#: collapses below 10 us, where each wake-up walks every missed fire time.
APS_INTERVAL_S = 0.001
APS_INTERVAL_ENV = "PEERS_APS_INTERVAL"


def _noop() -> bool:
    return True


def _sleep50() -> bool:
    time.sleep(SLEEP_S)
    return True


def _idle() -> bool:
    return False


BODIES: dict[str, Callable[[], bool]] = {"noop": _noop, "sleep50": _sleep50, "idle": _idle}


def _open() -> int | None:
    path = os.environ.get(RECORDS_ENV)
    if not path:
        return None
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


_FD = _open()
_BODY = BODIES[os.environ.get(BODY_ENV, "noop")]


def run_pass() -> bool:
    """One pass: record its start, run the body, record its end; whether it found work."""
    if _FD is None:
        raise RuntimeError(f"set ${RECORDS_ENV} to the file for the pass records")
    pid, start = os.getpid(), time.monotonic_ns()
    os.write(_FD, RECORD.pack(pid, start, 0))
    found = _BODY()
    os.write(_FD, RECORD.pack(pid, start, time.monotonic_ns()))
    return found


def setting(name: str) -> str:
    """A required setting from the environment, with a clear error when it is missing."""
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"set ${name} (bench/peers.py sets it for each run)")
    return value
