"""Simulated hosts: network namespaces linked to the coordinator's host by a userspace switch.

Each simulated host is a network namespace (``ip netns add``) with its own TUN
device and address; the coordinator's host is the root namespace, with a TUN
of its own. Addresses come from 198.18.0.0/24 (the benchmarking range, never
routed): a run takes one free /28 slot of it, so that two runs on one machine
do not collide, the coordinator's host at ``.1`` of the slot (198.18.0.1 for
slot 0) and the hosts after it.

The machine has no netem, iptables or tc classifiers, so a small switch moves
the packets: its own process (``python -m tests.chaos.netsim switch``, so that
the harness's GIL never delays a packet) polls every TUN fd, reads one IPv4
packet at a time and writes it to the TUN that owns its destination address.
On the way it applies each host's link faults, per direction (``up``: host to
coordinator, ``down``: coordinator to host): ``drop`` (cut), ``delay`` (seconds
of one-way latency, delivered at its time, in order) and ``flap`` (the link is
cut and restored every ``flap`` seconds, cut first). The harness steers it with
one JSON line per command on its stdin and reads one JSON answer per line; the
switch exits when its stdin closes or its parent dies.

A TUN fd opened in the root namespace stays attached to its device after
``ip link set DEV netns NS`` moves the device, so the switch opens them all and
``Net`` then moves each host's device into its namespace. The devices vanish
with the switch; ``Net.close`` deletes the namespaces, and a later ``Net.open``
deletes those of runs whose process is gone (names carry the owner's pid and a
tag of the run).

A process runs "on" host ``n`` through ``Net.command``: ``ip netns exec NS
unshare --uts sh -c 'hostname hN && exec "$@"'``, which keeps the pid (each step
execs), with its own ``TMPDIR`` and ``XDG_RUNTIME_DIR`` (``Net.host_env``), so
that ostinato's same-host shortcuts (runner ids from the hostname, liveness
locks in the runtime or temp folder) see only that host.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: The only addresses these hosts ever use.
NETWORK = ipaddress.ip_network("198.18.0.0/24")
SLOT_PREFIX = 28
SLOTS = 2 ** (SLOT_PREFIX - NETWORK.prefixlen)
#: Hosts per slot: the /28 less its network and broadcast addresses and the coordinator's.
MAX_HOSTS = 2 ** (32 - SLOT_PREFIX) - 3
NS_PREFIX = "ostc-"
LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1
#: Packets read from one TUN before the others get their turn.
BURST = 64


class NetUnavailable(Exception):
    """Simulated hosts cannot be made here; the message says why."""


# --------------------------------------------------------------------------- the switch


@dataclass
class Direction:
    """One direction of a host's link."""

    drop: bool = False
    delay: float = 0.0


@dataclass
class Link:
    """A host's link to the coordinator's host: ``up`` (host to coordinator) and ``down``."""

    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)
    #: Cut and restored every ``flap`` seconds from ``flap_since`` (cut first); 0: steady.
    flap: float = 0.0
    flap_since: float = 0.0

    def cut(self, now: float) -> bool:
        return self.flap > 0 and int((now - self.flap_since) / self.flap) % 2 == 0


@dataclass
class Counters:
    forwarded: int = 0
    dropped: int = 0
    delayed: int = 0
    unroutable: int = 0


class Switch:
    """Moves IPv4 packets between TUN fds by destination address, through each link's faults.

    ``nodes[0]`` is the coordinator's host; ``nodes[n]`` host ``n``. A packet from
    host ``i`` crosses link ``i`` up; a packet to host ``j`` crosses link ``j``
    down (host to host: both). It is dropped if a direction it crosses drops, and
    held for the sum of their delays. Held packets wait in one queue per
    (source, destination) pair, each delivered no earlier than the one before it.
    """

    def __init__(self, fds: list[int], addresses: list[bytes]) -> None:
        self.fds = fds
        self.owner = {address: n for n, address in enumerate(addresses)}
        self.links = [Link() for _ in fds]
        self.queues: dict[tuple[int, int], collections.deque[tuple[float, bytes]]] = {}
        self.counters = Counters()

    def route(self, source: int, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # not IPv4 (the devices have no IPv6 address)
        target = self.owner.get(packet[16:20])
        if target is None or target == source:
            self.counters.unroutable += 1
            return
        delay = 0.0
        for n, direction in ((source, "up"), (target, "down")):
            if n == 0:
                continue
            link = self.links[n]
            way: Direction = getattr(link, direction)
            if way.drop or link.cut(now):
                self.counters.dropped += 1
                return
            delay += way.delay
        queue = self.queues.get((source, target))
        if delay <= 0 and not queue:
            self.send(target, packet)
            return
        due = now + delay
        if queue:
            due = max(due, queue[-1][0])
        else:
            queue = self.queues[source, target] = collections.deque()
        queue.append((due, packet))
        self.counters.delayed += 1

    def send(self, target: int, packet: bytes) -> None:
        with contextlib.suppress(OSError):  # a device gone, or its queue full: a lost packet
            os.write(self.fds[target], packet)
            self.counters.forwarded += 1

    def release(self, now: float) -> float | None:
        """Deliver every held packet that is due; return when the next one is, if any."""
        soonest: float | None = None
        for (_, target), queue in list(self.queues.items()):
            while queue and queue[0][0] <= now:
                self.send(target, queue.popleft()[1])
            if queue:
                soonest = queue[0][0] if soonest is None else min(soonest, queue[0][0])
            else:
                del self.queues[_, target]
        return soonest

    def command(self, line: str) -> dict[str, Any]:
        order = json.loads(line)
        op = order.get("op")
        if op == "link":
            n = int(order["host"])
            if not 0 < n < len(self.links):
                return {"ok": False, "error": f"no host {n}"}
            now = time.monotonic()
            self.links[n] = Link(Direction(**order.get("up", {})), Direction(**order.get("down", {})),
                                 float(order.get("flap", 0.0)), now)
            return {"ok": True, "t": now}
        if op == "stats":
            queued = sum(len(q) for q in self.queues.values())
            return {"ok": True, "queued": queued, **vars(self.counters)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def serve(self, control: IO[str], answers: IO[str]) -> None:
        """Forward packets until ``control`` closes."""
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        ctl = control.fileno()
        poller.register(ctl, select.POLLIN | select.POLLHUP)
        by_fd = {fd: n for n, fd in enumerate(self.fds)}
        pending = b""
        due: float | None = None
        while True:
            timeout = -1 if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
            for fd, _ in poller.poll(timeout):
                if fd == ctl:
                    chunk = os.read(ctl, 65536)
                    if not chunk:
                        return
                    pending += chunk
                    while b"\n" in pending:
                        line, _, pending = pending.partition(b"\n")
                        try:
                            answer = self.command(line.decode())
                        except (ValueError, TypeError, KeyError) as exc:
                            answer = {"ok": False, "error": repr(exc)}
                        answers.write(json.dumps(answer) + "\n")
                        answers.flush()
                    continue
                source = by_fd[fd]
                for _ in range(BURST):
                    try:
                        packet = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    except OSError:
                        return  # a device went away under us: the run is over
                    self.route(source, packet, time.monotonic())
            due = self.release(time.monotonic()) if self.queues else None


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        sys.exit(0)  # the parent died before the line above


def switch_main(names: list[str], addresses: list[str]) -> int:
    die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(-10)  # a packet goes through before the runners' busy threads, as in a kernel
    fds = [open_tun(name) for name in names]
    switch = Switch(fds, [ipaddress.ip_address(a).packed for a in addresses])
    sys.stdout.write(json.dumps({"ok": True, "ready": names}) + "\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        switch.serve(sys.stdin, sys.stdout)
    return 0


# --------------------------------------------------------------------------- the harness side


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetUnavailable(f"ip {' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone; return their names."""
    gone = []
    for name in _namespaces():
        found = re.match(rf"{re.escape(NS_PREFIX)}(\d+)-", name)
        if found and not _alive(int(found.group(1))):
            with contextlib.suppress(NetUnavailable):
                _ip("netns", "del", name)
                gone.append(name)
    return gone


def why_unavailable() -> str | None:
    """Why simulated hosts cannot be made on this machine, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces and TUN devices)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "/dev/net/tun is missing"
    return None


@dataclass(frozen=True)
class Host:
    """Simulated host ``n`` (1-based): its namespace, device and address."""

    n: int
    namespace: str
    device: str
    address: str

    @property
    def hostname(self) -> str:
        return f"h{self.n}"


class Net:
    """``hosts`` simulated hosts and the coordinator's host, one switch between them.

    ``open`` makes everything (or raises ``NetUnavailable``), ``close`` undoes it;
    ``link`` sets one host's faults, ``heal`` clears them.
    """

    def __init__(self, hosts: int) -> None:
        if not 0 < hosts <= MAX_HOSTS:
            raise ValueError(f"1 to {MAX_HOSTS} hosts")
        self.size = hosts
        self.tag = uuid.uuid4().hex[:6]
        self.hosts: list[Host] = []
        self.coordinator_address = ""
        self.prefix = SLOT_PREFIX
        self._switch: subprocess.Popen[str] | None = None
        self._slot_fd: int | None = None
        self._coordinator_device = f"oc{self.tag}"
        self._made: list[str] = []

    def __enter__(self) -> Net:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_slot(self) -> ipaddress.IPv4Network:
        for slot, subnet in enumerate(NETWORK.subnets(new_prefix=SLOT_PREFIX)):
            fd = os.open(LOCK_DIR / f"ostinato-chaos-net-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._slot_fd = fd
            return subnet
        raise NetUnavailable(f"all {SLOTS} address slots of {NETWORK} are taken by other runs")

    def open(self) -> None:
        why = why_unavailable()
        if why is not None:
            raise NetUnavailable(why)
        sweep_stale()
        atexit.register(self.close)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        subnet = self._take_slot()
        addresses = list(subnet.hosts())
        self.coordinator_address = str(addresses[0])
        self.hosts = [
            Host(n, f"{NS_PREFIX}{os.getpid()}-{self.tag}-h{n}", f"oh{self.tag}{n}", str(addresses[n]))
            for n in range(1, self.size + 1)
        ]
        names = [self._coordinator_device, *(h.device for h in self.hosts)]
        self._switch = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.netsim", "switch", "--devices", ",".join(names),
             "--addresses", ",".join([self.coordinator_address, *(h.address for h in self.hosts)])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
        )
        ready = self._answer()
        if not ready.get("ok"):
            raise NetUnavailable(f"the switch did not start: {ready}")
        self._address(None, self._coordinator_device, self.coordinator_address)
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            self._made.append(host.namespace)
            _ip("link", "set", host.device, "netns", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            self._address(host.namespace, host.device, host.address)

    def _address(self, namespace: str | None, device: str, address: str) -> None:
        where = ["-n", namespace] if namespace else []
        _ip(*where, "addr", "add", f"{address}/{self.prefix}", "dev", device)
        _ip(*where, "link", "set", device, "up")

    def _answer(self) -> dict[str, Any]:
        assert self._switch is not None
        assert self._switch.stdout is not None
        line = self._switch.stdout.readline()
        if not line:
            raise NetUnavailable(f"the switch exited ({self._switch.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _ask(self, order: dict[str, Any]) -> dict[str, Any]:
        assert self._switch is not None
        assert self._switch.stdin is not None
        self._switch.stdin.write(json.dumps(order) + "\n")
        self._switch.stdin.flush()
        answer = self._answer()
        if not answer.get("ok"):
            raise RuntimeError(f"switch: {answer.get('error')}")
        return answer

    def host(self, n: int) -> Host:
        return self.hosts[n - 1]

    def link(self, n: int, *, up_drop: bool = False, down_drop: bool = False, delay: float = 0.0,
             flap: float = 0.0) -> float:
        """Set host ``n``'s link faults (``delay``: seconds each way); return when they took effect."""
        answer = self._ask({"op": "link", "host": n, "flap": flap,
                            "up": {"drop": up_drop, "delay": delay},
                            "down": {"drop": down_drop, "delay": delay}})
        return float(answer["t"])

    def cut(self, n: int) -> float:
        return self.link(n, up_drop=True, down_drop=True)

    def heal(self, n: int | None = None) -> float:
        """Clear the faults of host ``n``'s link, or of every link."""
        t = 0.0
        for host in self.hosts if n is None else [self.host(n)]:
            t = self.link(host.n)
        return t

    def stats(self) -> dict[str, Any]:
        return self._ask({"op": "stats"})

    def command(self, n: int, argv: list[str]) -> list[str]:
        """``argv`` run on host ``n``: in its namespace, with its own hostname; the pid stays."""
        host = self.host(n)
        return ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host.hostname, *argv]

    @staticmethod
    def host_env(n: int, folder: Path) -> dict[str, str]:
        """Host ``n``'s own ``TMPDIR`` and ``XDG_RUNTIME_DIR``, made under ``folder``."""
        base = folder / f"h{n}"
        tmp, runtime = base / "tmp", base / "runtime"
        for made in (tmp, runtime):
            made.mkdir(parents=True, exist_ok=True)
        runtime.chmod(0o700)
        return {"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": str(runtime)}

    def close(self) -> None:
        """Stop the switch (its devices go with it), delete the namespaces, free the slot."""
        if self._switch is not None:
            with contextlib.suppress(OSError, ValueError):
                if self._switch.stdin is not None:
                    self._switch.stdin.close()
            try:
                self._switch.wait(5)
            except subprocess.TimeoutExpired:
                self._switch.kill()
                self._switch.wait(5)
            if self._switch.stdout is not None:
                self._switch.stdout.close()
            self._switch = None
        for namespace in self._made:
            with contextlib.suppress(NetUnavailable):
                _ip("netns", "del", namespace)
        self._made.clear()
        with contextlib.suppress(NetUnavailable):  # only if the switch left it behind
            _ip("link", "del", self._coordinator_device)
        if self._slot_fd is not None:
            os.close(self._slot_fd)
            self._slot_fd = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.netsim")
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("switch", help="forward packets between TUN devices (steered on stdin)")
    run.add_argument("--devices", required=True, help="comma-separated: the coordinator's first")
    run.add_argument("--addresses", required=True, help="comma-separated, one per device")
    sub.add_parser("sweep", help="delete the namespaces of runs that are gone")
    args = parser.parse_args(argv)
    if args.what == "sweep":
        for name in sweep_stale():
            print(f"deleted {name}")
        return 0
    return switch_main(args.devices.split(","), args.addresses.split(","))


if __name__ == "__main__":
    sys.exit(main())
