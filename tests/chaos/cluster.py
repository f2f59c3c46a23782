"""Runner processes of the chaos workload, and the log of what the harness did to them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.chaos.netsim import Net

ROOT = Path(__file__).resolve().parents[2]
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SIGNAL_NAMES: dict[int, str] = {signal.SIGKILL: "KILL", signal.SIGTERM: "TERM"}


class EventLog:
    """``events.jsonl``: one JSON object per thing the harness or the nemesis did."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a")

    def write(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
        self._file.flush()

    def phase(self, name: str) -> float:
        t = time.monotonic()
        self.write("phase", name=name, t=t)
        return t

    def fault(self, fault: str, start: float, end: float, *, target: int | None = None,
              disruptive: bool = True, paused: bool = False, **detail: Any) -> None:
        self.write("fault", fault=fault, start=start, end=end, target=target,
                   disruptive=disruptive, paused=paused, detail=detail)

    def close(self) -> None:
        self._file.close()


@dataclass
class Runner:
    """One ``ostinato run`` process of the workload."""

    n: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    port: int | None = None
    exited: float | None = None
    killed_at: float | None = None
    #: The simulated host it runs on (``netsim``), or None: the harness's own host.
    host: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> str:
        """The process state letter from /proc (``T``: stopped), or ``X`` when gone."""
        return _state(Path(f"/proc/{self.pid}/stat"))

    def all_stopped(self) -> bool:
        """Whether every thread of the process is stopped (a SIGSTOP has taken effect)."""
        try:
            tasks = list(Path(f"/proc/{self.pid}/task").iterdir())
        except OSError:
            return False
        return bool(tasks) and all(_state(task / "stat") == "T" for task in tasks)

    def wait_stopped(self, timeout: float = 1.0) -> float:
        """When every thread was seen stopped (or ``timeout`` passed): after that, none of
        them can start anything until SIGCONT."""
        deadline = time.monotonic() + timeout
        while not self.all_stopped() and time.monotonic() < deadline:
            time.sleep(0.0002)
        return time.monotonic()


    def catches(self, sig: int) -> bool:
        """Whether the process has a handler for ``sig`` installed (SigCgt in /proc)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        for line in status.splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
        return False


def _state(stat: Path) -> str:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@dataclass
class Cluster:
    """The runners of one run: started, signalled, reaped, and every step logged.

    With ``net``, each runner runs on a simulated host of its own (the lowest one
    no live runner is on, unless told which).
    """

    run: Path
    events: EventLog
    url_for: Callable[[int], tuple[str, int | None]]
    env: dict[str, str]
    faketime: bool = False
    runners: list[Runner] = field(default_factory=list)
    net: Net | None = None

    def free_host(self) -> int:
        assert self.net is not None
        taken = {r.host for r in self.live()}
        free = [host.n for host in self.net.hosts if host.n not in taken]
        if not free:
            raise RuntimeError(f"every one of the {len(self.net.hosts)} simulated hosts has a runner")
        return free[0]

    def start(self, host: int | None = None) -> Runner:
        n = len(self.runners)
        url, port = self.url_for(n)
        env = dict(self.env)
        if self.faketime:
            spec = self.run / "ctl" / f"faketime-{n}"
            spec.write_text("+0\n")
            env.update(LD_PRELOAD=str(FAKETIME_LIB), FAKETIME_TIMESTAMP_FILE=str(spec),
                       FAKETIME_CACHE_DURATION="1", FAKETIME_DONT_FAKE_MONOTONIC="1",
                       DONT_FAKE_MONOTONIC="1")
        argv = [sys.executable, "-m", "ostinato", "run", "tests.chaos.workload:app",
                "--coordinator", url, "--log-format", "json"]
        if self.net is not None:
            host = host or self.free_host()
            argv = self.net.command(host, argv)  # the same pid: every step execs
            env.update(self.net.host_env(host, self.run / "hosts"))
        log = (self.run / "logs" / f"runner-{n}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=self.run, env=env, stdout=log, stderr=subprocess.STDOUT)
        runner = Runner(n, proc, log, port, host=host)
        self.runners.append(runner)
        self.events.write("runner_started", n=n, pid=proc.pid, t=time.monotonic(), host=host)
        return runner

    def live(self) -> list[Runner]:
        self.reap()
        return [r for r in self.runners if r.exited is None]

    def reap(self) -> None:
        """Note every runner that has exited since the last look."""
        for runner in self.runners:
            if runner.exited is None and runner.proc.poll() is not None:
                self._exited(runner)

    def _exited(self, runner: Runner) -> None:
        # A killed runner died when it was killed; others when they were seen gone.
        runner.exited = runner.killed_at or time.monotonic()
        runner.log.close()
        self.events.write("runner_exited", n=runner.n, pid=runner.pid, t=runner.exited,
                          code=runner.proc.returncode)

    def signal(self, runner: Runner, sig: int) -> float:
        """Send ``sig`` and return when it was sent."""
        if sig in SIGNAL_NAMES:
            self.events.write("signal", pid=runner.pid, sig=SIGNAL_NAMES[sig])
        os.kill(runner.pid, sig)
        at = time.monotonic()
        if sig == signal.SIGKILL:
            runner.killed_at = at
        return at

    def wait_exit(self, runner: Runner, timeout: float) -> bool:
        try:
            runner.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if runner.exited is None:
            self._exited(runner)
        return True

    def recent(self, within: float) -> list[Runner]:
        """Live runners whose passes wrote a record in the last ``within`` seconds: holders."""
        now = time.time()
        found = []
        for runner in self.live():
            try:
                if now - (self.run / "passes" / f"{runner.pid}.log").stat().st_mtime < within:
                    found.append(runner)
            except OSError:
                pass
        return found

    def in_pass(self, runner: Runner) -> bool:
        """Whether ``runner`` is in the middle of a pass right now (by its own records)."""
        path = self.run / "passes" / f"{runner.pid}.log"
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 8192))
                tail = f.read().decode(errors="replace").splitlines()[1:]
        except OSError:
            return False
        open_passes: set[str] = set()
        for line in tail:
            parts = line.split()
            if len(parts) > 2 and parts[0] == "S":
                open_passes.add(parts[1])
            elif len(parts) > 2 and parts[0] == "E":
                open_passes.discard(parts[1])
        return bool(open_passes)

    def stop_all(self, grace: float = 12.0, start: float = 10.0) -> None:
        """SIGCONT and SIGTERM every live runner; SIGKILL those still there after ``grace``.

        A runner started late in the run (one replacing a killed one) may still be importing;
        SIGTERM would kill it before it can stop gracefully, so each is first given up to
        ``start`` seconds to install its handler."""
        live = self.live()
        deadline = time.monotonic() + start
        for runner in live:
            while not runner.catches(signal.SIGTERM) and runner.proc.poll() is None \
                    and time.monotonic() < deadline:
                os.kill(runner.pid, signal.SIGCONT)  # a stopped one cannot get further
                time.sleep(0.01)
        for runner in live:
            try:
                os.kill(runner.pid, signal.SIGCONT)
                self.signal(runner, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for runner in live:
            if not self.wait_exit(runner, max(0.1, deadline - time.monotonic())):
                self.signal(runner, signal.SIGKILL)
                self.wait_exit(runner, 10)
        self.reap()
