"""The app the chaos suite runs: every pass records itself and makes one fenced write.

Each pass appends to ``$CHAOS_RUN/passes/<pid>.log`` (times from CLOCK_MONOTONIC,
which every process of the host shares, in ns)::

    S <seq> <loop> <pid> <fence> <start>                    the pass started
    P <seq> <loop> <pid> <fence> <t>                        it stops its own process now
    E <seq> <loop> <pid> <fence> <start> <end> <outcome>    it ended

``outcome`` is ``accepted`` or ``refused`` (the fenced store's answer), ``unheld``
(``ctx.holds()`` was false after the work, so no write was tried) or ``raised``.

Files in ``$CHAOS_RUN/ctl`` steer single passes for the nemesis:
``pause-<pid>`` (stop this process between the lease check and the fenced
write), ``raise-<loop>`` (raise while the monotonic time in it is ahead) and
``hang-<loop>`` (one pass, whoever takes the file, hangs for the seconds in it).

``CHAOS_PLANT`` plants bugs for the checker's own test: ``skip_lease_check``
(the runner never stops believing in its lease) and ``unfenced_store``.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import ostinato
from ostinato import loop as ostinato_loop
from tests.chaos.store import FencedStore

RUN = Path(os.environ.get("CHAOS_RUN", "/tmp/chaos"))
CTL = RUN / "ctl"
LEASE = os.environ.get("CHAOS_LEASE", "1s")
LOOPS = int(os.environ.get("CHAOS_LOOPS", "10"))
WORK = float(os.environ.get("CHAOS_WORK_MS", "10")) / 1000
PAUSE = os.environ.get("CHAOS_PAUSE", "50ms")
TIMEOUT = os.environ.get("CHAOS_TIMEOUT", "1s")
STALL = os.environ.get("CHAOS_STALL", "3s")
PLANT = set(filter(None, os.environ.get("CHAOS_PLANT", "").split(",")))
PID = os.getpid()

if "skip_lease_check" in PLANT:
    # The planted bug: a runner that skips the lease check keeps starting passes
    # (and ctx.holds() says yes) after its lease is gone.
    ostinato_loop.LocalLease.holds = lambda self, now=None: True  # type: ignore[method-assign]

app = ostinato.App("chaos", grace="5s")
STORE = FencedStore(RUN / "fenced.db", fenced="unfenced_store" not in PLANT)
_seq = itertools.count(1)
_fd = os.open(RUN / "passes" / f"{PID}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
# time.sleep is avoided: libfaketime (the wall-clock fault) breaks its absolute-deadline sleep.
_never = threading.Event()


def _record(*fields: object) -> None:
    os.write(_fd, (" ".join(map(str, fields)) + "\n").encode())


def _take(path: Path) -> str | None:
    """The file's text if this caller is the one that removed it, else None."""
    try:
        text = path.read_text()
        path.unlink()
    except (FileNotFoundError, ValueError):
        return None
    return text


def _steer(name: str) -> None:
    raising = CTL / f"raise-{name}"
    if raising.exists():
        try:
            until = float(raising.read_text() or 0)
        except (OSError, ValueError):
            until = 0.0
        if time.monotonic() < until:
            raise RuntimeError(f"chaos: planted failure in {name}")
    hang = _take(CTL / f"hang-{name}") if (CTL / f"hang-{name}").exists() else None
    if hang:
        _never.wait(float(hang))


def _stop_here(seq: int, name: str, fence: int) -> None:
    """Stop this process exactly between the lease check and the write.

    The caller holds the store's lock, so no thread of this process is inside a
    store transaction. The signal goes to this thread, which then stops at once
    (a signal sent to the process may be taken by another thread, letting this
    one run on for a moment); and it waits for the nemesis's ``cont-<pid>`` file,
    written just before SIGCONT, in case it did not stop at all.
    """
    _record("P", seq, name, PID, fence, time.monotonic_ns())
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    cont = CTL / f"cont-{PID}"
    deadline = time.monotonic() + 60
    while not cont.exists() and time.monotonic() < deadline:
        _never.wait(0.001)
    cont.unlink(missing_ok=True)


def _pass(name: str, ctx: ostinato.Pass) -> None:
    seq = next(_seq)
    start = round(ctx.started * 1e9)  # when the runner found the lease held
    _record("S", seq, name, PID, ctx.fence, start)
    outcome = "raised"
    try:
        _steer(name)
        _never.wait(WORK)
        if not ctx.holds():
            outcome = "unheld"
            return
        pausing = (CTL / f"pause-{PID}").exists() and _take(CTL / f"pause-{PID}") is not None
        with STORE.lock:
            if pausing:
                _stop_here(seq, name, ctx.fence)
            accepted = STORE.write(name, ctx.fence, PID, seq, time.monotonic_ns(), locked=True)
        outcome = "accepted" if accepted else "refused"
    finally:
        _record("E", seq, name, PID, ctx.fence, start, time.monotonic_ns(), outcome)


def _declare(name: str) -> None:
    @app.loop(name=name, lease=LEASE, pause=PAUSE, timeout=TIMEOUT, stall_after=STALL,
              error_backoff=("250ms", "2s"))
    def body(ctx: ostinato.Pass) -> None:
        _pass(name, ctx)


for _n in range(LOOPS):
    _declare(f"loop{_n:02d}")
