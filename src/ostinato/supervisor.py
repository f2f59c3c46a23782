"""``ostinato run --processes N``: keep N runner processes alive, for hosts with no process manager.

The supervisor hosts no loop itself. It starts N runners, starts again any
that exits (after a backoff that grows while they keep dying young), and on
SIGTERM or SIGINT passes SIGTERM on, waits for them to finish their passes and
release their leases, and exits 0. Under systemd, Kubernetes or Heroku, run one
runner per unit or container instead and let the platform do this.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from ostinato.logs import fields

log = logging.getLogger("ostinato.supervisor")

#: A runner that lived this long before exiting is restarted without delay.
HEALTHY_AFTER = 60.0
MAX_BACKOFF = 30.0


class Supervisor:
    """Keeps ``count`` copies of ``command`` running until told to stop."""

    def __init__(self, command: Sequence[str], count: int, *, grace: float = 30.0) -> None:
        self.command = list(command)
        self.count = count
        self.grace = grace
        self.stopping = False
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.backoff = [0.0] * count
        self.restart_at = [0.0] * count

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _spawn(self, slot: int) -> None:
        proc = subprocess.Popen(self.command)
        self.children[slot] = (proc, time.monotonic())
        log.info("runner %d started as pid %d", slot, proc.pid,
                 extra=fields("runner_spawned", runner=str(proc.pid)))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for slot in range(self.count):
            self._spawn(slot)
        while not self.stopping:
            now = time.monotonic()
            for slot in range(self.count):
                entry = self.children.get(slot)
                if entry is None:
                    if now >= self.restart_at[slot]:
                        self._spawn(slot)
                    continue
                proc, started = entry
                code = proc.poll()
                if code is None:
                    continue
                del self.children[slot]
                lived = now - started
                self.backoff[slot] = (
                    0.0 if lived >= HEALTHY_AFTER else min(MAX_BACKOFF, max(1.0, self.backoff[slot] * 2))
                )
                self.restart_at[slot] = now + self.backoff[slot]
                log.error(
                    "runner %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                    slot, proc.pid, _describe(code), lived, self.backoff[slot],
                    extra=fields("runner_died", runner=str(proc.pid)),
                )
            time.sleep(0.1)
        return self._shutdown()

    def _shutdown(self) -> int:
        procs = [proc for proc, _ in self.children.values()]
        log.info("stopping %d runner(s)", len(procs))
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 5.0
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("runner pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        return 0


def _describe(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def runner_command(argv: Sequence[str]) -> list[str]:
    """The command line of one runner: this one, less ``--processes``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "ostinato", *out]
