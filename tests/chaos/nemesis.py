"""The nemesis: faults injected at random but seeded times, each one logged as it happened.

Every fault is a small class: ``inject`` does it once, blocking until it has been
undone, and writes one ``fault`` event with its start and end on CLOCK_MONOTONIC.
``span`` is how long one injection and the recovery after it take, so that
``Nemesis.run`` can fit several into a run without them overlapping.

The faults with ``hosts`` (cross-host cells) run each runner on a simulated
host of its own (``netsim``) and work on one holder's link to the coordinator's
host, or on the server: ``prepare`` and ``restore`` set the stage up before the
runners start and put it back after they stopped.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tests.chaos.backends import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, Backend
from tests.chaos.cluster import FAKETIME_LIB, ROOT, Cluster, EventLog, Runner
from tests.chaos.netsim import Net
from tests.chaos.proxy import NORMAL, Mode, Proxy

ALL = ("sqlite", "redis", "postgres")
NETWORK = ("redis", "postgres")


@dataclass
class Stage:
    """What a fault can reach: the run, its runners, the server, the proxy."""

    run: Path
    cluster: Cluster
    backend: Backend
    proxy: Proxy | None
    events: EventLog
    rng: random.Random
    ttl: float
    tag: str
    loops: list[str]
    #: The simulated hosts, in a cross-host cell.
    net: Net | None = None

    def sleep(self, seconds: float) -> None:
        """Wait, noting runners that exit meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.02))
            self.cluster.reap()

    def holder(self) -> Runner:
        """A live runner that is running passes (so it holds leases)."""
        for _ in range(100):
            found = self.cluster.recent(0.5)
            if found:
                return self.rng.choice(sorted(found, key=lambda r: r.n))
            self.sleep(0.02)
        return self.rng.choice(self.cluster.live())

    def replace(self, host: int | None = None) -> None:
        """Start a runner in place of one that is gone (on ``host``), so the run keeps its size."""
        self.cluster.start(host)

    def address(self, runner: Runner) -> str:
        """The simulated address of ``runner``'s host."""
        assert self.net is not None
        assert runner.host is not None
        return self.net.host(runner.host).address


class Fault:
    """One kind of fault. ``disruptive``: it may legitimately move leases between runners."""

    name: ClassVar[str]
    disruptive: ClassVar[bool] = True
    backends: ClassVar[tuple[str, ...]] = ALL
    #: Runs with each runner on a simulated host of its own (a cross-host cell).
    hosts: ClassVar[bool] = False

    def unavailable(self, stage: Stage) -> str | None:
        """Why this fault cannot run here, or None."""
        return None

    def prepare(self, stage: Stage) -> None:
        """Before the runners start."""

    def restore(self, stage: Stage) -> None:
        """After the runners stopped: undo ``prepare``."""

    def span(self, ttl: float) -> float:
        raise NotImplementedError

    def inject(self, stage: Stage) -> None:
        raise NotImplementedError


class Kill9(Fault):
    """kill -9 of a holder in the middle of a pass; a fresh runner replaces it."""

    name = "kill9"

    def span(self, ttl: float) -> float:
        return 2 * ttl + 2.5

    def inject(self, stage: Stage) -> None:
        target = stage.holder()
        deadline = time.monotonic() + 1.0
        while not stage.cluster.in_pass(target) and time.monotonic() < deadline:
            time.sleep(0.002)
        at = stage.cluster.signal(target, signal.SIGKILL)
        stage.cluster.wait_exit(target, 10)
        stage.events.fault(self.name, at, at, target=target.pid, host=target.host)
        stage.sleep(stage.ttl / 2)
        stage.replace(target.host)


class Stop(Fault):
    """SIGSTOP of a holder for ``factor`` x the TTL, then SIGCONT."""

    factor: ClassVar[float]

    def span(self, ttl: float) -> float:
        return self.factor * ttl + 2 * ttl + 1.0

    def inject(self, stage: Stage) -> None:
        target = stage.holder()
        start = stage.cluster.signal(target, signal.SIGSTOP)
        seen = target.wait_stopped()  # a thread may start a pass until the stop takes effect
        time.sleep(max(0.0, start + self.factor * stage.ttl - time.monotonic()))
        end = stage.cluster.signal(target, signal.SIGCONT)
        stage.events.fault(self.name, start, end, target=target.pid, disruptive=self.disruptive,
                           paused=True, seen=seen, host=target.host)
        stage.sleep(2 * stage.ttl)


class StopLong(Stop):
    name = "stop_long"
    factor = 2.0


class StopShort(Stop):
    """0.3 x the TTL: shorter than what the lease has left, so no takeover may happen."""

    name = "stop_short"
    factor = 0.3
    disruptive = False


class PauseWrite(Fault):
    """A holder stops itself between its lease check and its fenced write, for 2 x the TTL."""

    name = "pause_write"

    def span(self, ttl: float) -> float:
        return 4 * ttl + 2.5

    def inject(self, stage: Stage) -> None:
        target = stage.holder()
        trigger = stage.run / "ctl" / f"pause-{target.pid}"
        trigger.write_text("1")
        deadline = time.monotonic() + 2.0
        while target.state() != "T" and time.monotonic() < deadline:
            time.sleep(0.001)
            if time.monotonic() > deadline - 1.0 and trigger.exists():
                trigger.unlink(missing_ok=True)  # no pass came by: give up, unless one took it
        if target.state() != "T":
            stage.events.write("fault_missed", fault=self.name, pid=target.pid)
            (stage.run / "ctl" / f"cont-{target.pid}").write_text("1")
            return
        start = target.wait_stopped()
        time.sleep(2 * stage.ttl)
        (stage.run / "ctl" / f"cont-{target.pid}").write_text("1")
        end = stage.cluster.signal(target, signal.SIGCONT)
        stage.events.fault(self.name, start, end, target=target.pid, paused=True)
        stage.sleep(2 * stage.ttl)


class Sigterm(Fault):
    """SIGTERM of a holder: it finishes its passes, releases, exits 0; a fresh runner replaces it."""

    name = "sigterm"

    def span(self, ttl: float) -> float:
        return ttl + 3.0

    def inject(self, stage: Stage) -> None:
        target = stage.holder()
        start = stage.cluster.signal(target, signal.SIGTERM)
        stage.cluster.wait_exit(target, 15)
        stage.events.fault(self.name, start, target.exited or time.monotonic(), target=target.pid)
        stage.sleep(0.5)
        stage.replace()


class ServerRestart(Fault):
    """kill -9 of the server and a restart: only a server the suite started itself (Redis,
    with no persistence, so it forgets every key)."""

    name = "server_restart"
    backends = NETWORK

    def unavailable(self, stage: Stage) -> str | None:
        if not stage.backend.restartable:
            return ("the server is the machine's, shared: never killed here "
                    "(conn_kill and blackhole stand in)")
        return None

    def span(self, ttl: float) -> float:
        return 2 * ttl + 2.0

    def inject(self, stage: Stage) -> None:
        start = time.monotonic()
        stage.backend.restart()
        stage.events.fault(self.name, start, time.monotonic())
        stage.sleep(2 * stage.ttl)


class ConnKill(Fault):
    """Close the runners' connections from the server (CLIENT KILL, pg_terminate_backend)."""

    name = "conn_kill"
    backends = NETWORK

    def span(self, ttl: float) -> float:
        return 2 * ttl + 1.5

    def inject(self, stage: Stage) -> None:
        start = time.monotonic()
        killed = stage.backend.kill_connections(stage.tag)
        stage.events.fault(self.name, start, time.monotonic(), killed=killed)
        stage.sleep(2 * stage.ttl)


class Blackhole(Fault):
    """Nothing gets through between one holder and the server for 3 x the TTL."""

    name = "blackhole"
    backends = NETWORK

    def span(self, ttl: float) -> float:
        return 5 * ttl + 1.5

    def inject(self, stage: Stage) -> None:
        assert stage.proxy is not None
        target = stage.holder()
        start = time.monotonic()
        stage.proxy.set_mode(Mode(blackhole=True), target.port)
        stage.sleep(3 * stage.ttl)
        stage.proxy.set_mode(NORMAL, target.port)
        stage.events.fault(self.name, start, time.monotonic(), target=target.pid)
        stage.sleep(2 * stage.ttl)


class Latency(Fault):
    """TTL/10 added each way between every runner and the server, for 3 x the TTL."""

    name = "latency"
    backends = NETWORK
    disruptive = False

    def span(self, ttl: float) -> float:
        return 4 * ttl + 1.0

    def inject(self, stage: Stage) -> None:
        assert stage.proxy is not None
        start = time.monotonic()
        stage.proxy.set_mode(Mode(delay=stage.ttl / 10))
        stage.sleep(3 * stage.ttl)
        stage.proxy.set_mode(NORMAL)
        stage.events.fault(self.name, start, time.monotonic(), disruptive=False,
                           delay=stage.ttl / 10)
        stage.sleep(stage.ttl)


class ClockJump(Fault):
    """The wall clock of one holder jumps an hour (libfaketime; CLOCK_MONOTONIC untouched)."""

    name = "clock_jump"
    disruptive = False
    HOUR = 3600.0

    def unavailable(self, stage: Stage) -> str | None:
        if not FAKETIME_LIB.exists():
            return f"libfaketime is missing ({FAKETIME_LIB}); apt-get install faketime"
        return None

    def span(self, ttl: float) -> float:
        return 2 * ttl + 2.5

    def inject(self, stage: Stage) -> None:
        target = stage.holder()
        spec = stage.run / "ctl" / f"faketime-{target.n}"
        shift = 0.0 if spec.read_text().strip() != "+0" else self.HOUR
        start = time.monotonic()
        spec.write_text(f"{shift:+.0f}\n")
        stage.events.fault(self.name, start, start, target=target.pid, disruptive=False, shift=shift)
        stage.sleep(2 * stage.ttl + 1.0)  # libfaketime reads the file again within a second


class Contention(Fault):
    """Four more processes writing to the coordinator's SQLite file for 3 x the TTL."""

    name = "contention"
    backends = ("sqlite",)
    disruptive = False
    PROCESSES = 4

    def span(self, ttl: float) -> float:
        return 4 * ttl + 1.5

    def inject(self, stage: Stage) -> None:
        seconds = 3 * stage.ttl
        start = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, "-m", "tests.chaos.contend",
                              str(stage.run / "coord.db"), str(seconds)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
            for _ in range(self.PROCESSES)
        ]
        writes = [int(proc.communicate(timeout=seconds + 30)[0] or 0) for proc in procs]
        stage.events.fault(self.name, start, time.monotonic(), disruptive=False,
                           processes=self.PROCESSES, writes=writes)
        stage.sleep(stage.ttl)


class Raise(Fault):
    """Passes of three loops raise for 2 x the TTL."""

    name = "raise"
    disruptive = False

    def span(self, ttl: float) -> float:
        return 2 * ttl + 3.0

    def inject(self, stage: Stage) -> None:
        chosen = stage.rng.sample(stage.loops, min(3, len(stage.loops)))
        start = time.monotonic()
        until = start + 2 * stage.ttl
        for loop in chosen:
            (stage.run / "ctl" / f"raise-{loop}").write_text(repr(until))
        stage.sleep(until - time.monotonic())
        stage.events.fault(self.name, start, until, disruptive=False, loops=chosen)
        stage.sleep(2.5)  # the error backoff is at most 2 s


class Hang(Fault):
    """One pass hangs for 2.5 x its timeout (the timeout is the TTL)."""

    name = "hang"
    disruptive = False

    def span(self, ttl: float) -> float:
        return 3.5 * ttl + 1.0

    def inject(self, stage: Stage) -> None:
        loop = stage.rng.choice(stage.loops)
        start = time.monotonic()
        (stage.run / "ctl" / f"hang-{loop}").write_text(repr(2.5 * stage.ttl))
        stage.sleep(2.5 * stage.ttl)
        stage.events.fault(self.name, start, time.monotonic(), disruptive=False, loop=loop)
        stage.sleep(stage.ttl)


# ------------------------------------------------------------------ across simulated hosts


class OnHosts(Fault):
    """A cross-host fault: every runner on a simulated host of its own, the server reached
    at the coordinator host's simulated address."""

    backends = NETWORK
    hosts = True

    def unavailable(self, stage: Stage) -> str | None:
        if stage.net is None:
            return "no simulated hosts (netsim)"
        if stage.backend.hosts_address is None:
            return f"the {stage.backend.name} server does not listen on the simulated hosts' network"
        return None


class LinkFault(OnHosts):
    """One holder's link to the coordinator's host, for 3 x the TTL: cut either way or both,
    ``delay`` x the TTL of one-way latency each way, or cut and restored every ``flap`` x the TTL."""

    up_drop: ClassVar[bool] = False
    down_drop: ClassVar[bool] = False
    delay: ClassVar[float] = 0.0
    flap: ClassVar[float] = 0.0

    def span(self, ttl: float) -> float:
        # After the heal, TCP may wait out its retransmission backoff (a second or two).
        return 5 * ttl + 2.0

    def inject(self, stage: Stage) -> None:
        assert stage.net is not None
        target = stage.holder()
        assert target.host is not None
        start = stage.net.link(target.host, up_drop=self.up_drop, down_drop=self.down_drop,
                               delay=self.delay * stage.ttl, flap=self.flap * stage.ttl)
        stage.sleep(start + 3 * stage.ttl - time.monotonic())
        end = stage.net.heal(target.host)
        stage.events.fault(self.name, start, end, target=target.pid, disruptive=self.disruptive,
                           host=target.host, delay=self.delay * stage.ttl, flap=self.flap * stage.ttl)
        stage.sleep(2 * stage.ttl + 1.0)


class Partition(LinkFault):
    """Nothing passes between one holder's host and the coordinator's, either way."""

    name = "partition"
    up_drop = down_drop = True


class RepliesLost(LinkFault):
    """The holder's requests reach the server; nothing comes back."""

    name = "replies_lost"
    down_drop = True


class RequestsLost(LinkFault):
    """Nothing the holder sends reaches the server; what the server sends gets through."""

    name = "requests_lost"
    up_drop = True


class Latency03(LinkFault):
    """0.3 x the TTL each way. One renewal's round trip (0.6 TTL) fits in its lease, but a
    runner renews one call at a time, a third of the TTL apart at best: the next answer
    comes 1.2 TTL after the last one left, past the lease. So the holder stops, gives
    the lease back, and the loop may move (never overlapping)."""

    name = "latency03"
    delay = 0.3


class Latency06(LinkFault):
    """0.6 x the TTL each way: a renewal answers after the lease it renewed ran out."""

    name = "latency06"
    delay = 0.6


class Latency12(LinkFault):
    name = "latency12"
    delay = 1.2


class Flap(LinkFault):
    """Cut and restored every quarter of the TTL."""

    name = "flap"
    flap = 0.25


class HostKill9(OnHosts, Kill9):
    """kill -9 of a holder on its host: the server sees its connections close, but no
    standby on another host can see its liveness lock."""

    name = "host_kill9"


class HostCrash(OnHosts):
    """A holder's host goes away: its link is cut, then the holder is killed -9, so the
    server never hears its connections close; the link comes back after 3 x the TTL (the
    host rebooted), and a fresh runner starts there."""

    name = "host_crash"

    def span(self, ttl: float) -> float:
        return 5 * ttl + 2.0

    def inject(self, stage: Stage) -> None:
        assert stage.net is not None
        target = stage.holder()
        assert target.host is not None
        deadline = time.monotonic() + 1.0
        while not stage.cluster.in_pass(target) and time.monotonic() < deadline:
            time.sleep(0.002)
        start = stage.net.cut(target.host)
        killed = stage.cluster.signal(target, signal.SIGKILL)
        stage.cluster.wait_exit(target, 10)
        stage.sleep(start + 3 * stage.ttl - time.monotonic())
        end = stage.net.heal(target.host)
        stage.events.fault(self.name, start, end, target=target.pid, host=target.host,
                           killed=killed)
        stage.sleep(stage.ttl / 2)
        stage.replace(target.host)
        stage.sleep(1.5 * stage.ttl + 1.0)


class HostSigstop(OnHosts, StopLong):
    """SIGSTOP of a holder on its host for 2 x the TTL, then SIGCONT."""

    name = "host_sigstop"


class CutSession(OnHosts):
    """A holder's link is cut both ways, and its server session ends while it cannot hear
    of it; the link heals ``hold`` seconds after the cut. ``sessions`` records what the
    server had from that host at the cut and just before the heal."""

    def hold(self, ttl: float) -> float:
        return 3 * ttl

    def span(self, ttl: float) -> float:
        return self.hold(ttl) + 2 * ttl + 2.0

    def end_session(self, stage: Stage, address: str, start: float) -> dict[str, object]:
        raise NotImplementedError

    def inject(self, stage: Stage) -> None:
        assert stage.net is not None
        target = stage.holder()
        assert target.host is not None
        address = stage.address(target)
        start = stage.net.cut(target.host)
        at_cut = stage.backend.sessions(stage.tag, address)
        detail = self.end_session(stage, address, start)
        stage.sleep(start + self.hold(stage.ttl) - time.monotonic())
        before_heal = stage.backend.sessions(stage.tag, address)
        end = stage.net.heal(target.host)
        stage.events.fault(self.name, start, end, target=target.pid, host=target.host,
                           sessions_at_cut=at_cut, sessions_before_heal=before_heal, **detail)
        stage.sleep(2 * stage.ttl + 1.0)


class CutTerminate(CutSession):
    """Cut, and 0.5 s later the server ends the holder's sessions (pg_terminate_backend,
    CLIENT KILL); the link heals 3 x the TTL after the cut."""

    name = "cut_terminate"
    AFTER = 0.5

    def end_session(self, stage: Stage, address: str, start: float) -> dict[str, object]:
        stage.sleep(start + self.AFTER - time.monotonic())
        at = time.monotonic()
        killed = stage.backend.kill_connections(stage.tag, address)
        return {"terminated": killed, "terminated_at": at}


class CutKeepalive(CutSession):
    """Cut, and the server's own TCP keepalive drops the silent sessions; the link heals once
    that has surely happened. The suite's servers probe an idle peer after 1 s: PostgreSQL
    every 1 s, 2 probes, and its ``tcp_user_timeout`` (3 s) drops a session whose answer
    was left unacknowledged (no probe goes out then); Redis derives its own probes, about
    4 s in all, and has no such timeout. ``dropped_at``: when the server was first seen
    with fewer sessions of each kind from that host (``connections``; for PostgreSQL
    ``lock_holders`` too, the lease session), as seconds after the cut."""

    name = "cut_keepalive"
    #: How long the link stays cut at most, waiting for every session to be dropped: the
    #: kernel checks ``tcp_user_timeout`` only when a retransmission timer fires, and those
    #: back off (0.2, 0.4, 0.8, 1.6, 3.2 s), so a 3 s timeout may end the session at 6.2 s.
    LONGEST = 15.0

    def hold(self, ttl: float) -> float:
        keepalive = KEEPALIVE_IDLE + max(KEEPALIVE_COUNT, 3) * KEEPALIVE_INTERVAL
        return max(3 * ttl, keepalive + 1.5)

    def span(self, ttl: float) -> float:
        return max(self.hold(ttl), self.LONGEST) + 2 * ttl + 2.0

    def end_session(self, stage: Stage, address: str, start: float) -> dict[str, object]:
        first = stage.backend.sessions(stage.tag, address)
        dropped: dict[str, float] = {}
        # The link heals at ``hold`` or once every kind of session was dropped, if later.
        until = start + self.LONGEST
        while time.monotonic() < until and len(dropped) < len(first):
            now = stage.backend.sessions(stage.tag, address)
            for kind, count in first.items():
                if kind not in dropped and now.get(kind, 0) < count:
                    dropped[kind] = round(time.monotonic() - start, 3)
            stage.sleep(0.1)
        return {"dropped_at": dropped}


class ClockStep(OnHosts):
    """The server's wall clock steps 30 s forward, and back 3 x the TTL later (the server
    runs on a clock the harness steps: libfaketime, or the clock shim for Redis).
    ``server_ahead``: the server's own reading, just after each step."""

    name = "clock_step"
    STEP = 30.0

    def unavailable(self, stage: Stage) -> str | None:
        return super().unavailable(stage) or stage.backend.clock_unavailable()

    def prepare(self, stage: Stage) -> None:
        stage.backend.server_clock(0.0)

    def restore(self, stage: Stage) -> None:
        stage.backend.server_clock(None)

    def span(self, ttl: float) -> float:
        return 5 * ttl + 2.0

    def inject(self, stage: Stage) -> None:
        start = time.monotonic()
        stage.backend.server_clock(self.STEP)
        ahead = self.ahead(stage)
        stage.sleep(start + 3 * stage.ttl - time.monotonic())
        end = time.monotonic()
        stage.backend.server_clock(0.0)
        stage.events.fault(self.name, start, end, step=self.STEP, server_ahead=ahead,
                           server_ahead_after=self.ahead(stage))
        stage.sleep(2 * stage.ttl + 1.0)

    @staticmethod
    def ahead(stage: Stage) -> float:
        """How far the server's wall clock reads ahead of the real one (to 0.01 s)."""
        return round(stage.backend.server_time() - time.time(), 2)


FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (Kill9(), StopLong(), StopShort(), PauseWrite(), Sigterm(), ServerRestart(),
                  ConnKill(), Blackhole(), Latency(), ClockJump(), Contention(), Raise(), Hang(),
                  Partition(), RepliesLost(), RequestsLost(), Latency03(), Latency06(), Latency12(),
                  Flap(), HostKill9(), HostCrash(), HostSigstop(), CutTerminate(), CutKeepalive(),
                  ClockStep())
}
#: The cross-host faults (each runner on a simulated host of its own).
CROSS_HOST = [name for name, fault in FAULTS.items() if fault.hosts]


class Nemesis:
    """Injects one kind of fault as many times as fits in ``seconds``, at seeded random times."""

    def __init__(self, stage: Stage, fault: Fault) -> None:
        self.stage, self.fault = stage, fault

    def run(self, seconds: float) -> int:
        """Return how many times the fault was injected."""
        span = self.fault.span(self.stage.ttl)
        count = max(1, int(seconds // span))
        slot = seconds / count
        began = time.monotonic()
        for i in range(count):
            at = began + i * slot + self.stage.rng.uniform(0, max(0.0, slot - span))
            self.stage.sleep(at - time.monotonic())
            self.fault.inject(self.stage)
        self.stage.sleep(began + seconds - time.monotonic())
        return count
