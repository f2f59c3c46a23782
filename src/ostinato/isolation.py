"""``isolation="process"``: each pass of a loop runs in a child process the runner owns.

The child is started once (spawned, so it shares no threads or locks with the
runner), imports the app itself and finds the body by the loop's name; then it
runs pass after pass. Only plain data crosses the pipe: the pass's fence and
number in, the outcome, the error text and the child's memory use out.

The runner's thread for the loop waits on the pipe and, while it waits:

* kills the child (SIGTERM, then SIGKILL after ``KILL_GRACE``) when the pass
  runs over its ``timeout``;
* kills it at once (SIGKILL) when the lease is lost, so that a runner taking
  over never overlaps with it;
* keeps the child's view of the lease deadline (``ctx.holds()``) current.

A child that dies (segfault, ``os._exit``, OOM kill) makes a failed pass, and
the next pass gets a fresh child. A child whose runner dies (kill -9) kills
itself at once, in the middle of a pass if need be: its lease died with the
runner and a standby may already hold the next one. ``max_passes`` and ``max_memory`` recycle the
child between passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ostinato.host import Host
from ostinato.loading import import_target
from ostinato.loop import IDLE, LocalLease, LoopSpec, Pass


class _Keeper(Protocol):
    """The keeper of an isolated loop, as its body sees it."""

    runner: Host
    spec: LoopSpec
    key: str
    _abort: list[bool]

    def _fields(self, event: str, fence: int | None = None) -> dict[str, object]: ...

log = logging.getLogger("ostinato.isolation")

#: How long a child has to exit after SIGTERM before it is killed.
KILL_GRACE = 2.0
#: How often the waiting thread looks at the clock and the lease during a pass.
TICK = 0.02


class PassError(Exception):
    """A pass that failed in its child process; ``summary`` is what status shows."""

    def __init__(self, summary: str, details: str = "") -> None:
        super().__init__(details or summary)
        self.summary = summary


class SharedDeadline:
    """Eight bytes of memory both processes map: the lease deadline, written by the runner."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = _anonymous_file()
            os.ftruncate(fd, 8)
        self.fd = fd
        self._map = mmap.mmap(fd, 8)

    @property
    def value(self) -> float:
        value: float = struct.unpack_from("d", self._map)[0]
        return value

    @value.setter
    def value(self, deadline: float) -> None:
        struct.pack_into("d", self._map, 0, deadline)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


def _anonymous_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("ostinato-deadline", 0)
    fd, path = tempfile.mkstemp(prefix="ostinato-deadline-")
    os.unlink(path)
    return fd


class _SharedLease(LocalLease):
    """The child's view of the lease: its deadline is read from memory the runner writes."""

    __slots__ = ("_shared",)

    def __init__(self, fence: int, ttl: float, shared: SharedDeadline) -> None:
        self._shared = shared
        super().__init__(fence, ttl, 0.0)

    @property
    def deadline(self) -> float:
        return self._shared.value

    @deadline.setter
    def deadline(self, value: float) -> None:
        pass  # only the runner moves the deadline


def _rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def die_with_parent() -> None:
    """Kill this process the moment its parent (the runner) dies, whatever it is doing."""
    parent = os.getppid()
    opener = getattr(os, "pidfd_open", None)
    pidfd: int | None = None
    if opener is not None:
        with contextlib.suppress(OSError):
            pidfd = opener(parent)

    def watch() -> None:
        if pidfd is not None and os.getppid() == parent:  # the pidfd is of the right process
            select.select([pidfd], [], [])
        else:  # no pidfd here: a reparented child has a new parent pid
            while os.getppid() == parent:
                time.sleep(TICK)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="ostinato-parent-watch", daemon=True).start()


def child_main(target: str, loop: str, ttl: float, conn: Connection, deadline: SharedDeadline) -> None:
    """The child's life: import the app, then answer pass requests until told to exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when passes stop
    die_with_parent()
    try:
        hosted: Any = import_target(target)
        spec = hosted.loops[loop]
    except BaseException as exc:
        conn.send(("broken", f"{type(exc).__name__}: {exc}"))
        return
    runner_loop = asyncio.new_event_loop() if spec.is_async else None
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "exit":
            return
        _, fence, number, scheduled_for, missed, partition, key = message
        ctx = Pass(loop, _SharedLease(fence, ttl, deadline), number, time.monotonic(), app=hosted.name,
                   scheduled_for=scheduled_for, missed=missed, partition=partition,
                   partitions=spec.partitions if partition is not None else None, key=key)
        try:
            if runner_loop is not None:
                result = runner_loop.run_until_complete(spec.body(ctx))
            else:
                result = spec.body(ctx)
        except BaseException as exc:
            summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            conn.send(("failed", summary[:2000], traceback.format_exc()[-8000:], _rss()))
        else:
            conn.send(("idle" if result is IDLE else "worked", None, None, _rss()))


class Worker:
    """One child process, started ahead of the pass that will use it.

    The child is a new interpreter (``python -m ostinato._child``), never a
    fork of the runner, so it inherits none of the runner's threads or locks and
    does not re-run the user's ``__main__``.
    """

    def __init__(self, target: str, spec: LoopSpec) -> None:
        self.spec = spec
        self.deadline = SharedDeadline()
        self.deadline.value = float("-inf")
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ostinato._child", target, spec.name, repr(spec.lease),
             str(theirs.fileno()), str(self.deadline.fd)],
            pass_fds=(theirs.fileno(), self.deadline.fd),
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False
        self.closed = False
        self.passes = 0
        self.rss = 0

    def _await_ready(self, lease: LocalLease) -> None:
        while not self.ready:
            if not self.conn.poll(TICK):
                if self.process.poll() is not None:
                    raise PassError(f"worker process could not start ({self._exit()})")
                if not lease.holds():
                    raise PassError("lease lost while the worker process was starting")
                continue
            try:
                message = self.conn.recv()
            except EOFError:
                raise PassError(f"worker process could not start ({self._exit()})") from None
            if message[0] == "broken":
                raise PassError(f"worker process could not load the loop: {message[1]}")
            self.ready = True

    def run(self, ctx: Pass, lease: LocalLease, abort: list[bool]) -> Any:
        """Run one pass in the child; return its result or raise ``PassError``."""
        self.deadline.value = lease.effective_deadline()
        self._await_ready(lease)
        started = time.monotonic()
        self.conn.send(("pass", ctx.fence, ctx.number, ctx.scheduled_for, ctx.missed, ctx.partition,
                        ctx.key))
        self.passes += 1
        timeout = self.spec.timeout
        while not self.conn.poll(TICK):
            self.deadline.value = lease.effective_deadline()
            now = time.monotonic()
            if not lease.holds(now) or abort[0]:
                # A standby may take the loop now: the child must not outlive the lease.
                self.kill(graceful=False)
                why = "the lease was lost" if not abort[0] else "the runner is stopping"
                raise PassError(f"pass killed: {why} while it ran")
            if timeout is not None and now - started > timeout:
                self.kill(graceful=True)
                raise PassError(f"TimeoutError: pass ran over its timeout of {timeout}s; "
                                "its process was killed")
            if self.process.poll() is not None:
                break
        try:
            outcome, summary, details, rss = self.conn.recv()
        except (EOFError, OSError):
            raise PassError(f"worker process died during the pass ({self._exit()})") from None
        self.rss = rss
        if outcome == "failed":
            raise PassError(summary, details)
        return IDLE if outcome == "idle" else None

    def worn_out(self) -> str | None:
        """Why this child should be replaced before the next pass, if it should."""
        if self.spec.max_passes is not None and self.passes >= self.spec.max_passes:
            return f"it ran {self.passes} passes (max_passes={self.spec.max_passes})"
        if self.spec.max_memory is not None and self.rss > self.spec.max_memory:
            return f"it uses {self.rss / 2**20:.0f} MiB (max_memory={self.spec.max_memory / 2**20:.0f} MiB)"
        return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def _exit(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(0.5)
        code = self.process.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def kill(self, *, graceful: bool) -> None:
        if self.closed:
            return
        if self.alive() and graceful:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(KILL_GRACE)
        if self.alive():
            self.process.kill()
        self.process.wait()
        self.closed = True
        self.conn.close()
        self.deadline.close()

    def retire(self) -> None:
        """Ask the child to exit between passes; kill it if it does not."""
        if self.closed:
            return
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("exit",))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(KILL_GRACE)
        self.kill(graceful=False)


def main(argv: list[str]) -> None:
    """Entry of ``python -m ostinato._child TARGET LOOP TTL CONN_FD DEADLINE_FD``."""
    target, loop, ttl, conn_fd, deadline_fd = argv
    child_main(target, loop, float(ttl), Connection(int(conn_fd)), SharedDeadline(int(deadline_fd)))


class IsolatedBody:
    """The body of an ``isolation="process"`` loop: passes run in a reused child process."""

    def __init__(self, keeper: _Keeper, lease: LocalLease) -> None:
        target = keeper.runner.app_target
        if target is None:
            raise RuntimeError("isolation='process' needs the runner to know the app's import path")
        self.keeper, self.lease, self.target = keeper, lease, target
        self.worker = Worker(target, keeper.spec)  # warmed up before the first pass

    def call(self, ctx: Pass) -> Any:
        worker = self.worker
        try:
            return worker.run(ctx, self.lease, self.keeper._abort)
        finally:
            why = "its process died" if not worker.alive() else worker.worn_out()
            if why is not None and not self.keeper.runner.stopping:
                if worker.alive():
                    log.info("%s: recycling the worker process because %s", self.keeper.key, why,
                             extra=self.keeper._fields("worker_recycled", ctx.fence))
                    worker.retire()
                self.worker = Worker(self.target, self.keeper.spec)

    def close(self) -> None:
        self.worker.retire()
