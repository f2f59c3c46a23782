"""``make demo``: two runners of the metrics app on SQLite, a kill -9, and a live status table.

It shows passes happening, the loops spread over the two runners, the first
runner killed, and the survivor taking over the loops the first one held, each
under a greater fence. Every claim it prints (which loops the
killed runner held, each loop's holder and fence before and after) is read from
the coordinator's records, never assumed.

Its scratch folder (``$TMPDIR/ostinato-demo-*``) is removed on every exit,
Ctrl-C and SIGTERM included, once the runners it started are gone.

    python examples/demo.py [--short]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ostinato.coordinators import from_url

HERE = Path(__file__).resolve().parent
OSTINATO = [sys.executable, "-m", "ostinato"]
#: How long the demo waits for something it expects (a holder for every loop, a takeover).
PATIENCE = 30.0


@dataclass(frozen=True)
class Held:
    """One loop as the coordinator records it: its holder (``host:pid``, or None) and fence."""

    holder: str | None
    fence: int

    def __str__(self) -> str:
        return f"{self.holder or '-'} fence {self.fence}"


#: Every loop's record, by key (``app:loop``).
Snapshot = dict[str, Held]


def read(url: str) -> Snapshot:
    """Every loop's holder and fence, read from the coordinator at ``url`` now."""

    async def loops() -> Snapshot:
        coordinator = from_url(url)
        await coordinator.open()
        try:
            return {r.key: Held(r.holder, r.fence) for r in await coordinator.loops()}
        finally:
            await coordinator.close()

    return asyncio.run(loops())


def label(pid: int) -> str:
    """The holder a runner started here appears as in the coordinator's records."""
    return f"{socket.gethostname()}:{pid}"


def names(keys: Sequence[str]) -> str:
    return ", ".join(keys) if keys else "no loop"


def kill_claim(before: Snapshot, killed: str) -> str:
    """What a kill -9 of runner ``killed`` hits, as the coordinator recorded it just before."""
    hit = sorted(k for k, h in before.items() if h.holder == killed)
    spared = sorted(k for k in before if k not in hit)
    line = f"*** kill -9 of runner {killed}, the holder of {names(hit)}"
    if spared:
        line += "; not its loops: " + ", ".join(f"{k} ({before[k]})" for k in spared)
    return line + " ***"


def changes(before: Snapshot, after: Snapshot, killed: str) -> list[str]:
    """One line per loop: holder and fence before and after the kill, and what that means."""
    lines = []
    width = max((len(k) for k in before), default=0)
    for key in sorted(before):
        was, now = before[key], after.get(key, Held(None, before[key].fence))
        if was.holder != killed:
            verdict = ("unchanged: its holder was not killed" if now == was
                       else "changed, though its holder was not killed")
        elif now.holder is None:
            verdict = "not taken over yet"
        elif now.fence > was.fence:
            verdict = f"taken over by {now.holder}, fence went up"
        else:
            verdict = f"taken over by {now.holder}, fence did NOT go up"
        lines.append(f"  {key:<{width}}  {was} -> {now}   {verdict}")
    return lines


def taken_over(before: Snapshot, killed: str) -> Callable[[Snapshot], bool]:
    """Whether every loop ``killed`` held has a live holder again."""
    hit = [k for k, h in before.items() if h.holder == killed]

    def done(now: Snapshot) -> bool:
        return all(now.get(k, Held(None, 0)).holder not in (None, killed) for k in hit)

    return done


def poll(url: str, done: Callable[[Snapshot], bool], timeout: float = PATIENCE) -> tuple[Snapshot, bool]:
    """Read the coordinator every 20 ms until ``done``; the last snapshot and whether it came true."""
    deadline = time.monotonic() + timeout
    while True:
        now = read(url)
        if done(now) or time.monotonic() > deadline:
            return now, done(now)
        time.sleep(0.02)


def status(url: str) -> str:
    result = subprocess.run([*OSTINATO, "status", "--coordinator", url], capture_output=True,
                            text=True, check=False)
    return result.stdout.rstrip() or result.stderr.rstrip()


def show(url: str, title: str) -> None:
    print(f"\n=== {title} ===\n{status(url)}\n", flush=True)


class Demo:
    """The runners started in ``work`` and what happens to them."""

    def __init__(self, work: Path, short: bool) -> None:
        self.work = work
        self.short = short
        self.url = f"sqlite:///{work / 'ostinato.db'}"
        self.env = {**os.environ, "METRICS_DB": str(work / "metrics.db"), "PYTHONUNBUFFERED": "1"}
        self.runners: dict[str, subprocess.Popen[bytes]] = {}
        self.started = time.monotonic()

    def start(self) -> str:
        proc = subprocess.Popen([*OSTINATO, "run", f"{HERE / 'metrics.py'}:app", "--coordinator",
                                 self.url, "--log-level", "info"], env=self.env)
        self.runners[label(proc.pid)] = proc
        print(f"started runner {label(proc.pid)}", flush=True)
        return label(proc.pid)

    def run(self) -> None:
        print(f"two runners of examples/metrics.py:app on {self.url}", flush=True)
        first = self.start()
        snapshot, ok = poll(self.url, lambda s: bool(s) and all(h.holder for h in s.values()))
        if not ok:
            print(f"!!! some loops have no holder after {PATIENCE:.0f}s: {snapshot}", flush=True)
        second = self.start()
        if self.short:
            # Long enough for the loops to be balanced over both runners, most of the time.
            poll(self.url, lambda s: any(h.holder == second for h in s.values()), timeout=5.0)
            show(self.url, f"status after {time.monotonic() - self.started:.1f}s")
        else:
            for _ in range(4):
                time.sleep(1.5)
                show(self.url, f"status after {time.monotonic() - self.started:.1f}s")

        before = read(self.url)
        victim, survivor = first, second
        self.runners[victim].kill()
        self.runners[victim].wait()
        killed_at = time.monotonic()
        print(f"\n{kill_claim(before, victim)}\n", flush=True)

        after, ok = poll(self.url, taken_over(before, victim))
        took = time.monotonic() - killed_at
        if ok:
            title = (f"{took * 1000:.0f} ms after the kill (the coordinator read every 20 ms): "
                     f"every loop of {victim} has a live holder")
        else:
            title = f"{took:.0f}s after the kill: some loops of {victim} are still not taken over"
        print(f"=== {title} ===", flush=True)
        print("\n".join(changes(before, after, victim)), flush=True)
        show(self.url, "status after the takeover")
        if not self.short:
            time.sleep(3.0)
            show(self.url, "3s later")

        print(f"*** SIGTERM to runner {survivor}: finishes its passes, releases, exits ***",
              flush=True)
        self.runners[survivor].send_signal(signal.SIGTERM)
        print(f"runner {survivor} exited with {self.runners[survivor].wait(35)}", flush=True)
        final = read(self.url)
        still = sorted(k for k, h in final.items() if h.holder is not None)
        show(self.url, "after a graceful stop: " + (f"still held: {names(still)}" if still
                                                   else "no loop has a holder"))

    def stop_runners(self) -> None:
        """Stop every runner still alive: SIGTERM, then SIGKILL after 5 s."""
        alive = [p for p in self.runners.values() if p.poll() is None]
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in alive:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _exit_on(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--short", action="store_true",
                        help="one status table before the kill and none after (for tests)")
    args = parser.parse_args(argv)
    # SIGTERM and SIGHUP end the demo the way Ctrl-C does: through the cleanup below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)
    # Ctrl-C raises KeyboardInterrupt even when the demo was started with SIGINT ignored
    # (as a background job of a script is).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="ostinato-demo-"))
    demo = Demo(work, args.short)
    try:
        demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the runners", flush=True)
        return 130
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        demo.stop_runners()
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
