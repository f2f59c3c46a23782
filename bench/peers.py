"""ostinato against its peers: the article's three ways, done with the tools people use, in one run.

Run it as ``.venv/bin/python bench/peers.py`` (the peers come with the ``bench``
extra: ``pip install -e '.[bench,redis]'``). One run takes about seven minutes on
two cores, prints one table and writes every raw figure, the machine's facts,
the goals and whether each was met to ``bench/results/peers.json``.

The arrangements (each one a module of ``bench/peers_apps/``, started with the
tool's own command line, every process in a session of its own):

* **rq chain**: an RQ job that runs the pass and then enqueues the next copy of
  itself (``rq worker``, the default forking ``Worker``).
* **celery clock + lock**: ``celery beat`` enqueues a task every second; the task
  (``celery worker``, default prefork pool) takes a Redis ``SET NX PX`` lock with
  a random token (10 s expiry), runs the pass and releases the lock with a Lua
  compare-and-delete.
* **while True**: a plain loop in a process of its own, the floor for the cost of
  a pass; and the same loop taking or renewing a Redis lease (``SET NX PX`` /
  token-checked ``PEXPIRE``, 10 s) before every pass, a copy without the lease
  asking again every 100 ms.
* **APScheduler 3**: a ``BlockingScheduler`` in a process of its own, interval
  trigger of 1 ms, ``max_instances=1``, ``coalesce=True``; and, for throughput
  and idle cost only, the same at 0.1 ms, about its fastest (it accepts down to
  1 us, but collapses below 10 us).
* **ostinato**: one back-to-back loop (``@app.loop``) under ``ostinato run``, on
  ``sqlite://`` and on ``redis://`` (default 10 s lease).

Redis is the local server, database 14 (flushed at the start and at the end),
every run's keys named after the run. Every pass of every arrangement is the same
function: it appends ``(pid, start, 0)`` as it starts and ``(pid, start, end)``
as it ends (``time.monotonic_ns()``, 24-byte records) to a file under /dev/shm,
and runs the body between: ``noop`` (returns at once) or ``sleep50``
(``time.sleep(0.05)``). Every figure comes from those records, never from a
tool's own counters.

What is measured, and how:

1. **Passes per second and gaps.** One worker of the arrangement (plus its clock).
   Once its first pass is on file and ``WARMUP_S`` more have passed, a window of
   ``WINDOW_S`` is timed: passes that started in it are counted, and the time
   from each pass's end to the next one's start gives the gap p50/p99/max.
   The CPU time and memory of the arrangement's processes during the window are
   kept too.
2. **Overlaps.** Two workers (or two copies) of the arrangement, one clock, for
   ``OVERLAP_WINDOW_S``: the pairs of passes whose [start, end] intersect.
3. **Resume after kill -9.** Right after the overlap window of the ``sleep50``
   body, the benchmark waits for a pass that is 5 to 35 ms into its 50 ms, and
   sends SIGKILL to the worker running it: the whole worker (for RQ the worker
   and its work horse, for Celery the worker and its pool processes, found from
   ``/proc``), never the clock. A fresh worker is started at once, as a
   supervisor would. The resume time runs from just before the kill to the start
   of the next pass anyone begins; nothing within ``RESUME_TIMEOUT_S`` is "never".
4. **Idle cost.** The ``idle`` body finds no work, and every arrangement reacts
   its own way: ostinato returns ``ostinato.IDLE`` (backoff 100 ms to 5 s); the
   plain loops sleep 1 s; the Celery clock keeps ticking every second; the RQ
   chain and APScheduler keep firing at full rate (they have no way to back off),
   and an RQ worker with an empty queue is shown beside them. One worker each;
   the quiet arrangements side by side for ``IDLE_WINDOW_S`` after
   ``IDLE_SETTLE_S``, the busy ones one at a time for ``BUSY_IDLE_WINDOW_S``.
   CPU time is summed over all of the arrangement's processes, reaped children
   included (``/proc/<pid>/stat`` utime+stime+cutime+cstime, in clock ticks);
   where the set of threads did not change during the window, the exact
   per-thread ``schedstat`` nanoseconds are used instead. The Redis server's own
   CPU time (``INFO cpu``) is kept beside it, not added: in the side-by-side
   group it is shared by all of them.
5. **Memory.** The sum of ``VmRSS`` over the arrangement's processes (workers,
   work horses, pool processes, clock), sampled ``MEMORY_SAMPLES`` times across
   the no-op throughput window; the peak is reported (an RQ work horse lives
   only while a job runs), with ``Pss`` (shared pages split between processes)
   beside it.

Each CPU figure comes with the whole machine's busy share over the same window
(``/proc/stat``), because the machine may be shared with other work.

Ratios are against ostinato measured in the same run, on SQLite and on Redis.
Every process is killed when its measurement ends and when the benchmark ends,
however it ends (the direct children also die with it through
``PR_SET_PDEATHSIG``); record files, databases and logs live in temporary
folders that are removed at the end.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry

import ostinato

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    base_machine_facts,
    death_signal,
    finish,
    int64_columns,
    logged_problems,
    percentile,
    proc_stat,
    report_end,
    set_up_process,
    shm_folder,
    timestamp,
    write_json,
)
from peers_apps.common import (  # noqa: E402
    APS_INTERVAL_ENV,
    APS_INTERVAL_S,
    BODY_ENV,
    CLOCK_PERIOD_S,
    IDLE_SLEEP_S,
    KEY_ENV,
    LOCK_TTL_MS,
    RECORD,
    RECORDS_ENV,
    REDIS_ENV,
    SLEEP_S,
    STANDBY_POLL_S,
)

RESULTS = BENCH / "results" / "peers.json"
REDIS_URL = "redis://127.0.0.1:6379/14"

BODIES = ("noop", "sleep50")
WINDOW_S = 10.0  # each throughput window
OVERLAP_WINDOW_S = 5.0  # each window with two workers
WARMUP_S = 1.0  # after the first pass, before a window opens
SETTLE_AFTER_S = 0.2  # after a window closes: passes that started in it finish
START_TIMEOUT_S = 30.0  # for an arrangement's first pass
VICTIM_TIMEOUT_S = 15.0  # for a pass to kill
KILL_INTO_PASS_S = (0.005, 0.035)  # how far into its 50 ms the killed pass is
RESUME_TIMEOUT_S = 30.0  # no pass within this after the kill: "never"
IDLE_SETTLE_S = 5.0
MEMORY_SAMPLES = 5  # spread over each throughput window; the peak is reported
IDLE_WINDOW_S = 30.0
BUSY_IDLE_WINDOW_S = 10.0
OSTINATO_LEASE_S = 10.0  # ostinato's default, not set by the bench app
APS_FAST_INTERVAL_S = 0.0001

PASSES_RATIO_GOAL = 100.0
GAP_P99_GOAL_S = 0.001

_CLK_TCK = os.sysconf("SC_CLK_TCK")

log = logging.getLogger("bench.peers")


# -- small helpers -------------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _bin(name: str) -> str:
    """A console script installed next to this Python (the project's venv)."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"cannot find the {name} command next to {sys.executable}; "
                         "install the peers with: pip install -e '.[bench,redis]'")
    return found


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def redis_cpu_s() -> float:
    """The Redis server's own CPU time (user + system), from INFO."""
    info = _redis().info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- machine facts ---------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: Common facts that peers.json gives under "versions" (ostinato) or not at all.
_NOT_IN_PEERS_FACTS = ("python_implementation", "sqlite", "ostinato")


def machine_facts() -> dict[str, Any]:
    """The common facts, the clock tick CPU time is counted in, and every peer's version."""
    facts = {k: v for k, v in base_machine_facts().items() if k not in _NOT_IN_PEERS_FACTS}
    return {
        **facts,
        "clock_ticks_per_s": _CLK_TCK,
        "versions": {
            "ostinato": ostinato.__version__,
            **{name: _version(name) for name in ("rq", "celery", "kombu", "apscheduler", "redis")},
            "redis_server": _redis().info("server")["redis_version"],
        },
    }


# -- the arrangements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One arrangement: how to start its workers (and clock), and what it is measured for."""

    key: str
    label: str
    setup: str
    worker: Callable[[Run, int], list[str]]
    clock: Callable[[Run], list[str]] | None = None
    kick: Callable[[Run], None] | None = None
    state: Callable[[Run], dict[str, Any]] | None = None  # looked at after the kill test
    coordinator: str | None = None  # ostinato's backend: "sqlite" or "redis"
    phases: frozenset[str] = frozenset({"throughput", "overlap", "idle"})
    bodies: tuple[str, ...] = BODIES
    busy_idle: bool = False  # its idle state still fires at full rate: measured alone
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One start of an arrangement: its unique name, body, record file and scratch folder."""

    peer: Peer
    name: str
    body: str
    records: Path
    tmp: Path

    def env(self) -> dict[str, str]:
        paths = [str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), RECORDS_ENV: str(self.records),
                BODY_ENV: self.body, REDIS_ENV: REDIS_URL, KEY_ENV: self.name, **self.peer.env}

    def coordinator_url(self) -> str:
        if self.peer.coordinator == "sqlite":
            return f"sqlite:///{self.tmp / (self.name + '.db')}"  # absolute: four slashes
        return f"{REDIS_URL}?prefix={self.name}"


def rq_worker(run: Run, number: int) -> list[str]:
    return [_bin("rq"), "worker", "--url", REDIS_URL, "--logging_level", "WARNING", run.name]


def rq_kick(run: Run) -> None:
    """Forge the chain's first link; every link forges the next."""
    Queue(run.name, connection=_redis()).enqueue("peers_apps.rq_chain.link")


def rq_state(run: Run) -> dict[str, Any]:
    """Where the chain's links are: queued, started (held by a worker) or failed."""
    queue = Queue(run.name, connection=_redis())
    return {"queued": queue.count, "started": StartedJobRegistry(queue=queue).count,
            "failed": FailedJobRegistry(queue=queue).count}


def celery_worker(run: Run, number: int) -> list[str]:
    return [_bin("celery"), "-A", "peers_apps.celery_lock", "worker", "--loglevel", "WARNING",
            "--hostname", f"{run.name}-{number}@%h"]


def celery_beat(run: Run) -> list[str]:
    return [_bin("celery"), "-A", "peers_apps.celery_lock", "beat", "--loglevel", "WARNING",
            "--schedule", str(run.tmp / f"{run.name}.beat"),
            "--pidfile", str(run.tmp / f"{run.name}.beat.pid")]


def plain_loop(run: Run, number: int) -> list[str]:
    return [sys.executable, "-m", "peers_apps.plain_loop"]


def lease_loop(run: Run, number: int) -> list[str]:
    return [sys.executable, "-m", "peers_apps.plain_loop", "lease"]


def aps(run: Run, number: int) -> list[str]:
    return [sys.executable, "-m", "peers_apps.aps_interval"]


def ostinato_runner(run: Run, number: int) -> list[str]:
    return [_bin("ostinato"), "run", "peers_apps.ostinato_loop:app",
            "--coordinator", run.coordinator_url(), "--log-level", "warning"]


OSTINATO_SETUP = ("ostinato run peers_apps.ostinato_loop:app: one back-to-back @app.loop, "
                  "default 10 s lease; the idle body returns ostinato.IDLE (backoff 100 ms..5 s)")
PEERS: tuple[Peer, ...] = (
    Peer("ostinato_sqlite", "ostinato, sqlite://", f"{OSTINATO_SETUP}; sqlite:///<tmp>/<run>.db",
         ostinato_runner, coordinator="sqlite"),
    Peer("ostinato_redis", "ostinato, redis://", f"{OSTINATO_SETUP}; {REDIS_URL}?prefix=<run>",
         ostinato_runner, coordinator="redis"),
    Peer("rq_chain", "rq chain (re-enqueue)",
         "rq worker (default forking Worker) on a queue of its own; the job runs the pass and "
         "enqueues the next copy of itself in a finally; the bench enqueues the first link",
         rq_worker, kick=rq_kick, state=rq_state, busy_idle=True),
    Peer("celery_clock", "celery beat 1 s + lock",
         f"celery beat every {CLOCK_PERIOD_S:g} s enqueues a task; celery worker (prefork, "
         f"default concurrency = CPUs) runs it: SET lock token NX PX {LOCK_TTL_MS}, the pass, "
         "Lua compare-and-delete; a task that finds the lock taken returns", celery_worker,
         clock=celery_beat),
    Peer("while_loop", "while True",
         f"python -m peers_apps.plain_loop: while True: pass; sleep {IDLE_SLEEP_S:g} s after a "
         "pass that found no work; two copies are simply two processes", plain_loop),
    Peer("while_lease", "while True + redis lease",
         f"python -m peers_apps.plain_loop lease: before every pass SET key token NX PX "
         f"{LOCK_TTL_MS} or renew (Lua: PEXPIRE if still its token); without the lease, ask again "
         f"every {STANDBY_POLL_S * 1000:g} ms; sleep {IDLE_SLEEP_S:g} s after no work",
         lease_loop),
    Peer("apscheduler", f"apscheduler {APS_INTERVAL_S * 1000:g} ms",
         f"python -m peers_apps.aps_interval: BlockingScheduler, interval trigger "
         f"{APS_INTERVAL_S * 1000:g} ms, max_instances=1, coalesce=True, thread pool executor",
         aps, busy_idle=True),
    Peer("apscheduler_fast", f"apscheduler {APS_FAST_INTERVAL_S * 1000:g} ms",
         f"the same at {APS_FAST_INTERVAL_S * 1000:g} ms, about APScheduler's fastest here",
         aps, phases=frozenset({"throughput", "idle"}), busy_idle=True,
         env={APS_INTERVAL_ENV: str(APS_FAST_INTERVAL_S)}),
    Peer("rq_empty", "rq worker, empty queue",
         "rq worker on a queue nobody enqueues to: the chain's worker once the chain is gone",
         rq_worker, phases=frozenset({"idle"})),
)
OSTINATO_KEYS = ("ostinato_sqlite", "ostinato_redis")


# -- processes ---------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def descendants(roots: Iterable[int]) -> list[int]:
    """``roots`` and every live process below them."""
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen and Path(f"/proc/{pid}").exists():
            seen.append(pid)
            todo.extend(children(pid))
    return seen


class Procs:
    """Every process the benchmark starts, each in a session of its own, logging to its own file."""

    def __init__(self, logs: Path, cwd: Path) -> None:
        self.logs, self.cwd = logs, cwd
        self.procs: list[subprocess.Popen[bytes]] = []
        self._arm = death_signal()

    def start(self, label: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        path = self.logs / f"{len(self.procs):03d}-{label}.log"
        with path.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                    start_new_session=True, preexec_fn=self._arm)
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(procs: Iterable[subprocess.Popen[bytes]]) -> None:
        """SIGKILL each process, everything below it and its process group, then reap them."""
        procs = list(procs)
        alive = [p for p in procs if p.returncode is None]
        below = descendants(p.pid for p in alive)
        for proc in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the session we made for it
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def close(self) -> None:
        self.kill(self.procs)

    def problems(self) -> list[str]:
        """Tracebacks and error lines the arrangements logged."""
        return logged_problems(self.logs.glob("*.log"), ("Traceback", "ERROR", "CRITICAL"), width=400)


class Arrangement:
    """One arrangement running: its clock (if any), its workers, its record file."""

    def __init__(self, procs: Procs, run: Run) -> None:
        self.procs, self.run = procs, run
        self.workers: list[subprocess.Popen[bytes]] = []
        self.clocks: list[subprocess.Popen[bytes]] = []
        self._started = 0

    def add_worker(self) -> subprocess.Popen[bytes]:
        argv = self.run.peer.worker(self.run, self._started)
        self._started += 1
        proc = self.procs.start(f"{self.run.name}-w{self._started}", argv, self.run.env())
        self.workers.append(proc)
        return proc

    def start(self, workers: int) -> None:
        for _ in range(workers):
            self.add_worker()
        clock = self.run.peer.clock
        if clock is not None:
            self.clocks.append(self.procs.start(f"{self.run.name}-clock", clock(self.run),
                                                self.run.env()))
        if self.run.peer.kick is not None:
            self.run.peer.kick(self.run)

    def roots(self) -> list[int]:
        return [p.pid for p in self.clocks + self.workers if p.poll() is None]

    def pids(self) -> list[int]:
        return descendants(self.roots())

    def stop(self) -> None:
        Procs.kill(self.clocks + self.workers)

    def check_alive(self) -> None:
        for proc in self.clocks + self.workers:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.run.name}: process {proc.pid} exited with "
                                   f"{proc.returncode} (its log is in the problems below)")


@contextlib.contextmanager
def arrangement(procs: Procs, run: Run, workers: int) -> Iterator[Arrangement]:
    arr = Arrangement(procs, run)
    try:
        arr.start(workers)
        yield arr
    finally:
        arr.stop()
        run.records.unlink(missing_ok=True)


# -- /proc: CPU and memory ---------------------------------------------------------------------------


def cpu_ticks(pids: Iterable[int]) -> int:
    """utime + stime + cutime + cstime: what these processes and their reaped children used."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = proc_stat(pid)
            total += sum(int(f) for f in fields[11:15])
    return total


def sched_ns(pids: Iterable[int]) -> tuple[int, frozenset[int]]:
    """CPU nanoseconds of every live thread of these processes, and the set of those threads."""
    total, tids = 0, set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    total += int((task / "schedstat").read_text().split()[0])
                    tids.add(int(task.name))
    return total, frozenset(tids)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuMeter:
    """CPU time used by an arrangement's processes between ``__init__`` and ``stop``.

    The whole machine's busy share over the same time is kept too: the machine is
    shared, and anything else running shows there.
    """

    def __init__(self, arr: Arrangement) -> None:
        self.arr = arr
        pids = arr.pids()
        self.t0 = time.monotonic()
        self.machine0 = machine_jiffies()
        self.ticks0 = cpu_ticks(pids)
        self.ns0, self.tids0 = sched_ns(pids)

    def stop(self) -> dict[str, Any]:
        pids = self.arr.pids()
        ticks, (ns, tids) = cpu_ticks(pids), sched_ns(pids)
        window = time.monotonic() - self.t0
        busy, total = (now - then for now, then in zip(machine_jiffies(), self.machine0, strict=True))
        exact = tids == self.tids0
        used = (ns - self.ns0) / 1e9 if exact else (ticks - self.ticks0) / _CLK_TCK
        return {
            "window_s": window,
            "cpu_s": used,
            "method": "schedstat ns" if exact else "clock ticks (threads or processes changed)",
            "cpu_s_ticks": (ticks - self.ticks0) / _CLK_TCK,
            "cpu_s_per_min": used * 60 / window,
            "pct_of_core": used / window * 100,
            "processes": len(pids),
            "threads": len(tids),
            "machine_busy_pct_of_all_cpus": ratio(busy * 100, total),
            "machine_busy_cpu_s": busy / _CLK_TCK,
        }


def peak_memory(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the most RSS, with every sample's RSS beside it."""
    peak = max(samples, key=lambda s: s["rss_mib"])
    return {**peak, "rss_samples_mib": [s["rss_mib"] for s in samples]}


def memory(pids: Iterable[int]) -> dict[str, Any]:
    """Summed VmRSS (and Pss) of these processes, in MiB."""
    rss = pss = count = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                    count += 1
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": count}


# -- records -----------------------------------------------------------------------------------------


def read_records(path: Path) -> tuple[array[int], array[int], array[int]]:
    """The (pids, starts, ends) of every complete record in ``path``; end 0 marks a start."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    pids, starts, ends = int64_columns(raw, 3)
    return pids, starts, ends


class Tail:
    """Follows a record file as it grows; knows which passes are running right now."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.running: dict[tuple[int, int], None] = {}  # (pid, start) of passes not yet ended

    def poll(self) -> list[tuple[int, int, int]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                raw = f.read()
        except FileNotFoundError:
            return []
        raw = raw[: len(raw) // RECORD.size * RECORD.size]
        self.offset += len(raw)
        new = list(RECORD.iter_unpack(raw))
        for pid, start, end in new:
            if end:
                self.running.pop((pid, start), None)
            else:
                self.running[(pid, start)] = None
        return new


def wait_first_pass(arr: Arrangement, timeout: float) -> None:
    """Return once the arrangement has finished a pass."""
    tail, deadline = Tail(arr.run.records), time.monotonic() + timeout
    while not any(end for _pid, _start, end in tail.poll()):
        arr.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{arr.run.name}: no pass within {timeout:g} s")
        time.sleep(0.005)


def _gap_summary(gaps: array[int]) -> dict[str, float | None]:
    ordered = sorted(gaps)

    def q(value: float) -> float | None:
        found = percentile(ordered, value)
        return None if found is None else found / 1e9

    return {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999),
            "max": ordered[-1] / 1e9 if ordered else None, "count": len(ordered)}


def throughput_stats(path: Path, t0: int, t1: int) -> dict[str, Any]:
    """Passes that started in [t0, t1), and end-to-start gaps between consecutive ones.

    One worker runs one pass at a time, so its complete records are in start order.
    """
    _pids, starts, ends = read_records(path)
    passes = unordered = 0
    gaps = array("q")
    prev_start = prev_end = -1
    for start, end in zip(starts, ends, strict=True):
        inside = t0 <= start < t1
        if not end:
            passes += inside
            continue
        if inside and prev_start >= t0:
            gaps.append(start - prev_end)
            unordered += start < prev_end
        prev_start, prev_end = start, end
    seconds = (t1 - t0) / 1e9
    return {"window_s": seconds, "passes": passes, "passes_per_s": passes / seconds,
            "gap_s": _gap_summary(gaps), "overlapping_consecutive_passes": unordered}


def overlap_stats(path: Path, t0: int, t1: int) -> dict[str, Any]:
    """Pairs of finished passes, started in [t0, t1), whose [start, end] intersect."""
    pids, starts, ends = read_records(path)
    keep = [i for i in range(len(ends)) if ends[i] and t0 <= starts[i] < t1]
    keep.sort(key=starts.__getitem__)
    s = array("q", (starts[i] for i in keep))
    e = array("q", (ends[i] for i in keep))
    pairs = involved = 0
    reach = -1  # the latest end among the passes so far
    for i in range(len(s)):
        later = bisect_left(s, e[i], i + 1) - i - 1  # passes starting before this one ends
        pairs += later
        involved += later > 0 or reach > s[i]
        reach = max(reach, e[i])
    return {"window_s": (t1 - t0) / 1e9, "passes": len(s), "pairs": pairs,
            "passes_overlapping": involved, "pids": len({pids[i] for i in keep})}


# -- 1: passes per second and gaps --------------------------------------------------------------------


@dataclass
class Bench:
    """What every measurement needs: the process table and the scratch folders."""

    procs: Procs
    tmp: Path
    shm: Path

    def run(self, peer: Peer, phase: str, body: str) -> Run:
        name = f"peers.{peer.key}.{phase}.{body}"
        return Run(peer, name, body, self.shm / f"{name}.rec", self.tmp)


def measure_throughput(bench: Bench, peer: Peer, body: str) -> dict[str, Any]:
    run = bench.run(peer, "throughput", body)
    with arrangement(bench.procs, run, workers=1) as arr:
        wait_first_pass(arr, START_TIMEOUT_S)
        time.sleep(WARMUP_S)
        meter, redis0, t0 = CpuMeter(arr), redis_cpu_s(), time.monotonic_ns()
        samples = []
        for number in range(1, MEMORY_SAMPLES + 1):
            time.sleep(max(0.0, t0 / 1e9 + WINDOW_S * number / (MEMORY_SAMPLES + 1) - time.monotonic()))
            samples.append(memory(arr.pids()))
        time.sleep(max(0.0, t0 / 1e9 + WINDOW_S - time.monotonic()))
        t1 = time.monotonic_ns()
        cpu, redis1 = meter.stop(), redis_cpu_s()
        arr.check_alive()
        time.sleep(SETTLE_AFTER_S)
        arr.stop()
        stats = throughput_stats(run.records, t0, t1)
    stats["cpu"] = cpu
    stats["cpu_us_per_pass"] = ratio(cpu["cpu_s"] * 1e6, stats["passes"])
    stats["redis_server_cpu_s"] = redis1 - redis0
    # everything else the machine did meanwhile (this benchmark's own process included)
    stats["other_cpu_s_per_s"] = (cpu["machine_busy_cpu_s"] - cpu["cpu_s"] - (redis1 - redis0)) / (
        cpu["window_s"])
    stats["memory"] = peak_memory(samples)
    return stats


# -- 2 and 3: overlaps with two workers; resume after kill -9 -------------------------------------------


def _owner(arr: Arrangement, pid: int) -> subprocess.Popen[bytes] | None:
    """The worker ``pid`` belongs to (itself, its work horse or a pool process)."""
    for proc in arr.workers:
        if proc.poll() is None and pid in descendants([proc.pid]):
            return proc
    return None


def find_victim(arr: Arrangement, tail: Tail) -> tuple[int, int, subprocess.Popen[bytes]]:
    """A worker whose pass is between 5 and 35 ms into its 50 ms: (pid, pass start, worker)."""
    low, high = (int(s * 1e9) for s in KILL_INTO_PASS_S)
    deadline = time.monotonic() + VICTIM_TIMEOUT_S
    while time.monotonic() < deadline:
        tail.poll()
        now = time.monotonic_ns()
        for pid, start in list(tail.running):
            if low <= now - start <= high:
                owner = _owner(arr, pid)
                if owner is not None:
                    return pid, start, owner
        time.sleep(0.001)
    raise TimeoutError(f"{arr.run.name}: no pass to kill within {VICTIM_TIMEOUT_S:g} s")


def kill_and_resume(arr: Arrangement) -> dict[str, Any]:
    """Kill -9 the worker running a pass, start a fresh one, time the next pass's start."""
    tail = Tail(arr.run.records)
    pid, start, owner = find_victim(arr, tail)
    doomed = descendants([owner.pid])
    kill_ns = time.monotonic_ns()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(owner.pid, signal.SIGKILL)
    for each in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)
    owner.wait()
    arr.workers.remove(owner)
    fresh = arr.add_worker()
    resumed: tuple[int, int] | None = None
    deadline = time.monotonic() + RESUME_TIMEOUT_S
    while resumed is None and time.monotonic() < deadline:
        for p, s, e in tail.poll():
            if not e and s > kill_ns:
                resumed = (p, s)
                break
        time.sleep(0.001)
    killed_finished = any(p == pid and s == start and e for p, s, e in
                          zip(*read_records(arr.run.records), strict=True))
    by = None
    if resumed is not None:
        by = "fresh worker" if resumed[0] in descendants([fresh.pid]) else "standby / other copy"
    state = arr.run.peer.state
    return {
        "state_after": None if state is None else state(arr.run),
        "killed_pid": pid, "killed_worker_pid": owner.pid, "killed_processes": len(doomed),
        "killed_pass_was_into_s": (kill_ns - start) / 1e9,
        "killed_pass_finished": killed_finished,
        "resume_s": None if resumed is None else (resumed[1] - kill_ns) / 1e9,
        "resumed_by": by, "waited_s": RESUME_TIMEOUT_S,
    }


def measure_overlap(bench: Bench, peer: Peer, body: str) -> dict[str, Any]:
    run = bench.run(peer, "overlap", body)
    with arrangement(bench.procs, run, workers=2) as arr:
        wait_first_pass(arr, START_TIMEOUT_S)
        time.sleep(WARMUP_S)
        t0 = time.monotonic_ns()
        time.sleep(OVERLAP_WINDOW_S)
        t1 = time.monotonic_ns()
        mem = memory(arr.pids())
        arr.check_alive()
        time.sleep(SETTLE_AFTER_S)
        resume = kill_and_resume(arr) if body == "sleep50" else None
        arr.stop()
        stats = overlap_stats(run.records, t0, t1)
    stats["memory"] = mem
    if resume is not None:
        stats["resume"] = resume
    return stats


# -- 4: idle ---------------------------------------------------------------------------------------------


def _passes_in(path: Path, t0: int, t1: int) -> int:
    _pids, starts, ends = read_records(path)
    return sum(1 for s, e in zip(starts, ends, strict=True) if not e and t0 <= s < t1)


def measure_idle(bench: Bench, peers: Sequence[Peer], window: float) -> dict[str, dict[str, Any]]:
    """The idle body in one worker of each of ``peers``, side by side."""
    with contextlib.ExitStack() as stack:
        arrs = {}
        for peer in peers:
            run = bench.run(peer, "idle", "idle")
            arrs[peer.key] = stack.enter_context(arrangement(bench.procs, run, workers=1))
        for arr in arrs.values():
            if arr.run.peer.key != "rq_empty":  # an empty queue runs no pass
                wait_first_pass(arr, START_TIMEOUT_S)
        time.sleep(IDLE_SETTLE_S)
        meters, t0 = {k: CpuMeter(a) for k, a in arrs.items()}, time.monotonic_ns()
        redis0 = redis_cpu_s()
        time.sleep(window)
        t1 = time.monotonic_ns()
        results = {k: meters[k].stop() for k in arrs}
        redis_per_min = (redis_cpu_s() - redis0) * 60e9 / (t1 - t0)
        for key, arr in arrs.items():
            results[key]["redis_server_cpu_s_per_min"] = redis_per_min
            results[key]["redis_server_shared_by"] = [p.key for p in peers]
            arr.check_alive()
            results[key]["memory"] = memory(arr.pids())
            results[key]["passes_per_s"] = _passes_in(arr.run.records, t0, t1) / ((t1 - t0) / 1e9)
            results[key]["side_by_side_with"] = [p.key for p in peers if p.key != key]
    return results


# -- the whole run ------------------------------------------------------------------------------------------


def _attempt(problems: list[str], what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a failure is recorded as a problem, and the run goes on."""
    log.info("%s", what)
    try:
        return measure()
    except Exception as exc:  # one broken peer must not lose the others' figures
        log.exception("%s failed", what)
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_peer(bench: Bench, peer: Peer, problems: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"label": peer.label, "setup": peer.setup}
    if "throughput" in peer.phases:
        result["throughput"] = {
            body: _attempt(problems, f"{peer.key}: throughput, {body}",
                           functools.partial(measure_throughput, bench, peer, body))
            for body in peer.bodies
        }
    if "overlap" in peer.phases:
        result["overlap"] = {
            body: _attempt(problems, f"{peer.key}: two workers, {body}"
                           + (", then kill -9" if body == "sleep50" else ""),
                           functools.partial(measure_overlap, bench, peer, body))
            for body in peer.bodies
        }
    return result


def measure_all_idle(bench: Bench, problems: list[str]) -> dict[str, dict[str, Any]]:
    idle_peers = [p for p in PEERS if "idle" in p.phases]
    quiet = [p for p in idle_peers if not p.busy_idle]
    found = _attempt(problems, f"idle: {', '.join(p.key for p in quiet)} side by side",
                     lambda: measure_idle(bench, quiet, IDLE_WINDOW_S))
    results = {p.key: found.get(p.key, found) for p in quiet}
    for peer in (p for p in idle_peers if p.busy_idle):
        alone = _attempt(problems, f"idle: {peer.key} alone",
                         functools.partial(measure_idle, bench, [peer], BUSY_IDLE_WINDOW_S))
        results[peer.key] = alone.get(peer.key, alone)
    return results


# -- ratios and goals ---------------------------------------------------------------------------------------


def _get(result: Mapping[str, Any], *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def figures(peer: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of one arrangement (None where not measured or failed)."""
    resume = _get(peer, "overlap", "sleep50", "resume")
    return {
        **{f"passes_per_s_{b}": _get(peer, "throughput", b, "passes_per_s") for b in BODIES},
        **{f"gap_p50_s_{b}": _get(peer, "throughput", b, "gap_s", "p50") for b in BODIES},
        **{f"gap_p99_s_{b}": _get(peer, "throughput", b, "gap_s", "p99") for b in BODIES},
        **{f"overlaps_{b}": _get(peer, "overlap", b, "pairs") for b in BODIES},
        "resume_s": _get(resume, "resume_s") if isinstance(resume, Mapping) else None,
        "resumed": (isinstance(resume, Mapping) and "resume_s" in resume
                    and resume["resume_s"] is not None),
        "resume_measured": isinstance(resume, Mapping) and "resume_s" in resume,
        "idle_cpu_s_per_min": _get(peer, "idle", "cpu_s_per_min"),
        "rss_mib": _get(peer, "throughput", "noop", "memory", "rss_mib"),
    }


def ratios(table: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per peer, per ostinato backend: how many times better ostinato is (> 1: ostinato ahead)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for key, peer in table.items():
        if key in OSTINATO_KEYS:
            continue
        out[key] = {}
        for ost_key in OSTINATO_KEYS:
            ost = table[ost_key]
            resume = math.inf if peer["resume_measured"] and not peer["resumed"] else peer["resume_s"]
            out[key][ost_key] = {
                **{f"passes_per_s_{b}": ratio(ost[f"passes_per_s_{b}"], peer[f"passes_per_s_{b}"])
                   for b in BODIES},
                "gap_p99_noop": ratio(peer["gap_p99_s_noop"], ost["gap_p99_s_noop"]),
                "resume": ratio(resume, ost["resume_s"]),
                "idle_cpu": ratio(peer["idle_cpu_s_per_min"], ost["idle_cpu_s_per_min"]),
                "rss": ratio(peer["rss_mib"], ost["rss_mib"]),
            }
    return out


def _goal(goal: str, kind: str, value: Any, met: bool, **extra: Any) -> dict[str, Any]:
    """One goal; ``kind`` ("ratio", "seconds" or "count") says how ``value`` reads."""
    return {"goal": goal, "kind": kind, "value": value, "met": bool(met), **extra}


def _resume_or_inf(fig: Mapping[str, Any]) -> float | None:
    """The resume time; infinity for "never"; None where it was not measured."""
    if not fig["resume_measured"]:
        return None
    return math.inf if not fig["resumed"] else float(fig["resume_s"])


def _speed_goals(where: str, ost_key: str, rat: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = []
    for peer_key, name in (("rq_chain", "the RQ chain"), ("celery_clock", "the Celery clock")):
        value = rat[peer_key][ost_key]["passes_per_s_noop"]
        found.append(_goal(f"ostinato ({where}) passes/s >= {PASSES_RATIO_GOAL:g}x {name}, no-op body",
                           "ratio", value, value is not None and value >= PASSES_RATIO_GOAL))
    return found


def _resume_goal(goal: str, own: float | None, others: Mapping[str, float]) -> dict[str, Any]:
    fastest = min(others, key=lambda k: others[k]) if others else None
    best = None if fastest is None else others[fastest]
    return _goal(goal, "seconds", own, own is not None and best is not None and own < best,
                 fastest_peer=fastest, fastest_peer_s=best)


def _resume_goals(where: str, ost: Mapping[str, Any],
                  peers: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    own = _resume_or_inf(ost)
    others = {k: r for k, v in peers.items() if (r := _resume_or_inf(v)) is not None}
    single = {k: r for k, r in others.items() if not peers[k]["overlaps_sleep50"]}
    return [
        _resume_goal(f"ostinato ({where}) resumes after kill -9 faster than every peer", own, others),
        _resume_goal(f"ostinato ({where}) resumes after kill -9 faster than every peer that never "
                     "overlaps (a peer with overlaps never stopped: its second copy was running)",
                     own, single),
    ]


def _overlap_goal(where: str, ost: Mapping[str, Any],
                  peers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    overlapping = sorted(k for k, v in peers.items()
                         if (v["overlaps_noop"] or 0) + (v["overlaps_sleep50"] or 0) > 0)
    mine = [ost[f"overlaps_{b}"] for b in BODIES]
    total = None if None in mine else sum(mine)
    return _goal(f"ostinato ({where}) has zero overlaps with two runners where a peer shows some",
                 "count", total, total == 0 and bool(overlapping), peers_with_overlaps=overlapping)


def goals(table: Mapping[str, dict[str, Any]], rat: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = []
    peers = {k: v for k, v in table.items() if k not in OSTINATO_KEYS}
    for ost_key in OSTINATO_KEYS:
        where = ost_key.split("_")[1]
        found += _speed_goals(where, ost_key, rat)
        found += _resume_goals(where, table[ost_key], peers)
        found.append(_overlap_goal(where, table[ost_key], peers))
    for body in BODIES:
        value = table["ostinato_sqlite"][f"gap_p99_s_{body}"]
        found.append(_goal(f"ostinato (sqlite) gap end->start p99 < {GAP_P99_GOAL_S * 1000:g} ms, "
                           f"{body} body", "seconds", value,
                           value is not None and value < GAP_P99_GOAL_S))
    return found


# -- report -------------------------------------------------------------------------------------------------


def human(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "never"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale * 0.9995:  # 0.99999 s shows as 1s, never as 1e+03ms
            return f"{seconds / scale:.3g}{unit}" if seconds / scale < 999.5 else f"{seconds:.0f}s"
    return f"{seconds * 1e9:.0f}ns"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _times(value: float | str | None) -> str:
    if value is None:
        return "-"
    if value == "never" or math.isinf(value):  # "never" is infinity as read back from JSON
        return "inf"
    if value >= 10_000:
        exponent = math.floor(math.log10(value))
        return f"{value / 10**exponent:.2f}e{exponent}x"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.3g}x"


def _resume_cell(fig: Mapping[str, Any]) -> str:
    if not fig["resume_measured"]:
        return "-"
    return "never" if not fig["resumed"] else human(fig["resume_s"])


def _header(result: Mapping[str, Any]) -> list[str]:
    m = result["machine"]
    v = m["versions"]
    return [
        f"ostinato vs peers, {result['timestamp']}",
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}; ostinato {v['ostinato']}, "
        f"rq {v['rq']}, celery {v['celery']}, APScheduler {v['apscheduler']}, "
        f"redis-py {v['redis']}, Redis {v['redis_server']}",
        f"one worker: passes/s and gaps over {WINDOW_S:g} s; two workers: overlapping pairs over "
        f"{OVERLAP_WINDOW_S:g} s; kill -9 mid-pass (50 ms body), wait <= {RESUME_TIMEOUT_S:g} s",
        f"other load on the machine during the throughput windows: up to "
        f"{_num(_other_load(result), 2)} CPU s/s (load average {m['loadavg_at_start'][0]:.2f} "
        f"at start, {m['loadavg_at_end'][0]:.2f} at end)",
    ]


def _other_load(result: Mapping[str, Any]) -> float | None:
    """The most CPU anything but the arrangement and Redis used during a throughput window."""
    found = [w["other_cpu_s_per_s"] for peer in result["peers"].values()
             for w in peer.get("throughput", {}).values() if "other_cpu_s_per_s" in w]
    return max(found, default=None)


def _figure_rows(result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"{'':<27}{'passes/s':>19}  {'gap end->start (no-op)':>22} {'gap':>8}  {'overlaps':>15}"
        f"  {'resume':>7} {'idle CPU':>9} {'RSS':>6}",
        f"{'arrangement':<27}{'no-op':>10}{'50 ms':>9}  {'p50':>8}{'p99':>8}{'max':>7} "
        f"{'p99 50ms':>8}  {'no-op':>8}{'50 ms':>7}  {'kill -9':>7} {'s/min':>9} {'MiB':>6}",
    ]
    for key, fig in result["figures"].items():
        gap_max = _get(result["peers"][key], "throughput", "noop", "gap_s", "max")
        lines.append(
            f"{result['peers'][key]['label']:<27}{_num(fig['passes_per_s_noop']):>10}"
            f"{_num(fig['passes_per_s_sleep50'], 1):>9}  {human(fig['gap_p50_s_noop']):>8}"
            f"{human(fig['gap_p99_s_noop']):>8}{human(gap_max):>7} "
            f"{human(fig['gap_p99_s_sleep50']):>8}  {_num(fig['overlaps_noop']):>8}"
            f"{_num(fig['overlaps_sleep50']):>7}  {_resume_cell(fig):>7} "
            f"{_num(fig['idle_cpu_s_per_min'], 3):>9} {_num(fig['rss_mib'], 1):>6}")
    return lines


def _ratio_rows(result: Mapping[str, Any]) -> list[str]:
    columns = ("passes_per_s_noop", "passes_per_s_sleep50", "gap_p99_noop", "resume", "idle_cpu",
               "rss")
    lines = [
        "ostinato's advantage, sqlite / redis (> 1x: ostinato ahead; passes/s: ostinato/peer, "
        "the rest: peer/ostinato)",
        f"{'':<27}{'passes/s no-op':>17}{'passes/s 50 ms':>17}{'gap p99':>17}{'resume':>17}"
        f"{'idle CPU':>17}{'RSS':>17}",
    ]
    for key, per in result["ratios"].items():
        cells = [f"{_times(per['ostinato_sqlite'][c])}/{_times(per['ostinato_redis'][c])}"
                 for c in columns]
        lines.append(f"{result['peers'][key]['label']:<27}" + "".join(f"{c:>17}" for c in cells))
    return lines


def _goal_rows(result: Mapping[str, Any]) -> list[str]:
    show = {"ratio": _times, "seconds": human, "count": _num}
    lines = ["goals"]
    for goal in result["goals"]:
        extra = ""
        if "fastest_peer" in goal:
            extra = f" (fastest peer: {goal['fastest_peer']}, {human(goal['fastest_peer_s'])})"
        if "peers_with_overlaps" in goal:
            extra = f" (peers with overlaps: {', '.join(goal['peers_with_overlaps']) or 'none'})"
        lines.append(f"  {'met   ' if goal['met'] else 'MISSED'} {goal['goal']}: "
                     f"{show[goal['kind']](goal['value'])}{extra}")
    return lines


def table(result: dict[str, Any]) -> str:
    lines = [*_header(result), "", *_figure_rows(result), "", *_ratio_rows(result), "",
             *_goal_rows(result)]
    lines += report_end(result, RESULTS)
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------


def settings() -> dict[str, Any]:
    return {
        "bodies": {"noop": "returns at once", "sleep50": f"time.sleep({SLEEP_S})",
                   "idle": "finds no work"},
        "window_s": WINDOW_S, "overlap_window_s": OVERLAP_WINDOW_S, "warmup_s": WARMUP_S,
        "kill_into_pass_s": list(KILL_INTO_PASS_S), "resume_timeout_s": RESUME_TIMEOUT_S,
        "idle_settle_s": IDLE_SETTLE_S, "idle_window_s": IDLE_WINDOW_S,
        "busy_idle_window_s": BUSY_IDLE_WINDOW_S, "redis": REDIS_URL,
        "celery_clock_period_s": CLOCK_PERIOD_S, "lock_and_lease_ttl_ms": LOCK_TTL_MS,
        "ostinato_lease_s": OSTINATO_LEASE_S, "lease_standby_poll_s": STANDBY_POLL_S,
        "plain_loop_idle_sleep_s": IDLE_SLEEP_S, "apscheduler_interval_s": APS_INTERVAL_S,
        "apscheduler_fast_interval_s": APS_FAST_INTERVAL_S,
        "records": "per pass: (pid, start, 0) then (pid, start, end), '<qqq' monotonic_ns, "
                   "unbuffered O_APPEND writes to a file under /dev/shm",
    }


def run() -> dict[str, Any]:
    began = time.monotonic()
    try:
        _redis().ping()
    except redis.RedisError as exc:
        raise SystemExit(f"cannot reach Redis at {REDIS_URL}: {exc}") from exc
    result: dict[str, Any] = {"timestamp": timestamp(),
                              "machine": machine_facts(), "settings": settings()}
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        _redis().flushdb()
        stack.callback(_redis().flushdb)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ostinato-peers-")))
        tmp = tmp.resolve()
        logs = tmp / "logs"
        logs.mkdir()
        procs = Procs(logs, tmp)
        stack.callback(procs.close)
        bench = Bench(procs, tmp, shm_folder(stack, tmp, "ostinato-peers-", log))
        peers = {p.key: measure_peer(bench, p, problems) for p in PEERS}
        for key, idle in measure_all_idle(bench, problems).items():
            peers[key]["idle"] = idle
        procs.close()
        problems += procs.problems()
    result["peers"] = peers
    result["figures"] = {k: figures(v) for k, v in peers.items()}
    result["ratios"] = ratios(result["figures"])
    result["goals"] = goals(result["figures"], result["ratios"])
    result["all_goals_met"] = all(g["met"] for g in result["goals"])
    result["problems"] = problems
    finish(result, began)
    return result


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: "never" stands for it."""
    if isinstance(value, float) and math.isinf(value):
        return "never"
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def main() -> int:
    set_up_process()
    result = run()
    write_json(RESULTS, _json_safe(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
