"""An app whose passes record what they did, for tests that run real runner processes.

Each pass appends ``S <loop> <pid> <fence> <start_ns>`` when it starts and
``E <loop> <pid> <fence> <start_ns> <end_ns>`` when it ends to
``$OSTINATO_TEST_RECORDS/<pid>.log`` (times from CLOCK_MONOTONIC, which every
process of one host shares). A pass's start is ``ctx.started``, the instant the runner
found the lease held and started it: a process stopped between that check and the body's
first line (waiting for the GIL, say) is in that pass while stopped, as it would be in the
middle of the body.
"""

from __future__ import annotations

import os
import time

import ostinato

RECORDS = os.environ.get("OSTINATO_TEST_RECORDS", "/tmp")
LEASE = os.environ.get("OSTINATO_TEST_LEASE", "10s")
WORK = float(os.environ.get("OSTINATO_TEST_WORK_MS", "2")) / 1000
LOOPS = int(os.environ.get("OSTINATO_TEST_LOOPS", "1"))
# "0" leaves the idle ``drain`` loop out, so a runner holding ``work`` never hands it
# over to balance the loops.
DRAIN = os.environ.get("OSTINATO_TEST_DRAIN", "1") == "1"

app = ostinato.App("work", grace="5s")
_fd: int | None = None


def _write(line: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(f"{RECORDS}/{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(_fd, line.encode())


def _started(ctx: ostinato.Pass) -> int:
    return round(ctx.started * 1e9)


def _make(name: str) -> None:
    @app.loop(name=name, lease=LEASE)
    def body(ctx: ostinato.Pass) -> None:
        start = _started(ctx)
        _write(f"S {ctx.loop} {os.getpid()} {ctx.fence} {start}\n")
        time.sleep(WORK)
        _write(f"E {ctx.loop} {os.getpid()} {ctx.fence} {start} {time.monotonic_ns()}\n")


for _n in range(LOOPS):
    _make(f"loop{_n}" if _n else "work")


def drain(ctx: ostinato.Pass) -> object:
    _write(f"S drain {os.getpid()} {ctx.fence} {_started(ctx)}\n")
    return ostinato.IDLE


if DRAIN:
    app.loop(idle=("1h", "1h"), lease=LEASE)(drain)

# Loops made of members, recorded under their member names (``shard#3``, ``tenant[acme]``).
PARTITIONS = int(os.environ.get("OSTINATO_TEST_PARTITIONS", "0"))
KEYS_FILE = os.environ.get("OSTINATO_TEST_KEYS_FILE")


def _member(ctx: ostinato.Pass) -> str:
    return ctx.lease_name.partition(":")[2]


if PARTITIONS:
    @app.loop(partitions=PARTITIONS, lease=LEASE, pause="5ms")
    def shard(ctx: ostinato.Pass) -> None:
        start = _started(ctx)
        _write(f"S {_member(ctx)} {os.getpid()} {ctx.fence} {start}\n")
        time.sleep(WORK)
        _write(f"E {_member(ctx)} {os.getpid()} {ctx.fence} {start} {time.monotonic_ns()}\n")

if KEYS_FILE:
    def _keys() -> list[str]:
        with open(KEYS_FILE) as listed:
            return listed.read().split()

    @app.loop(keys=_keys, refresh="500ms", lease=LEASE, pause="5ms")
    def tenant(ctx: ostinato.Pass) -> None:
        start = _started(ctx)
        _write(f"S {_member(ctx)} {os.getpid()} {ctx.fence} {start}\n")
        time.sleep(WORK)
        _write(f"E {_member(ctx)} {os.getpid()} {ctx.fence} {start} {time.monotonic_ns()}\n")
