"""Benchmark of ostinato's coordinators: throughput, failover and wake-up, on each backend.

Run it as ``.venv/bin/python bench/coordinators.py``. One run takes about three
minutes, prints a table and writes every raw figure, the machine's facts, the
settings, the goals and whether each was met to ``bench/results/coordinators.json``.

It needs the local servers: Redis (``$OSTINATO_BENCH_REDIS``, default
``redis://127.0.0.1:6379/13``) and PostgreSQL (``$OSTINATO_BENCH_POSTGRES``,
default ``postgresql://postgres@127.0.0.1:5432/test``). Every Redis key lives
under a prefix and every PostgreSQL table in a schema made for this run
(``obench_<pid>_<random>_<phase>``); both are deleted at the end, and the JSON
says what was left, if anything.

The measuring method is that of ``bench/core.py``, whose helpers it imports:

1. **Throughput.** A back-to-back loop with a sync body that only appends two
   8-byte records, its start and its end (``time.monotonic_ns()``), to a file
   under /dev/shm, hosted in this process (``async with app.running(...)``) on
   each coordinator in turn: ``core.sample``. Once the first pass is on file, a
   window of ``WINDOW_S`` seconds is timed; passes are counted from the records.
   ``REPEATS`` rounds, each visiting memory://, sqlite://, redis://,
   postgresql:// and the bare loop (the body called in a plain ``while``), with a
   fresh database, prefix or schema per window. Medians are reported, and the
   ratio of each coordinator's median to memory://'s in the same run (goal for
   Redis and PostgreSQL: >= 0.5, since the lease is renewed in the background and
   no pass makes a round trip).
2. **Failover.** Two ``ostinato run`` processes of
   ``bench/coordinator_apps.py:failover`` (the loop of ``bench/apps.py:failover``
   with its lease TTL taken from ``$OSTINATO_BENCH_LEASE``) share the coordinator.
   Once the standby is waiting, the holder gets SIGKILL; the failover time runs
   from ``time.monotonic_ns()`` just before ``os.kill`` to the start of the
   standby's first recorded pass (``core.kill_and_time``). A fresh runner then
   becomes the next standby; ``KILLS`` kills per coordinator. "Waiting" means:
   on SQLite, the standby has its runner lock file open (``core.wait_standby``);
   on Redis, its heartbeat is in the coordinator (its first ``acquire`` is sent
   before it); on PostgreSQL, that too, and its connection is blocked on the
   holder's advisory lock (an ungranted ``advisory`` row in ``pg_locks``); then
   ``STANDBY_SETTLE_S``. Lease TTL: the default 10 s on SQLite and PostgreSQL,
   which notice a dead holder at once (goal: p99 < 0.5 s); ``REDIS_LEASE`` on
   Redis, which cannot tell that a holder died and waits for the key to expire
   (goal: p99 under that TTL). With ``KILLS`` < 100, p99 is the maximum.
3. **Wake-up.** One ``ostinato run`` process hosting
   ``bench/coordinator_apps.py:wake``, a loop with ``idle=("1h", "1h")`` that
   records each pass's start and returns ``ostinato.IDLE``: after its first pass
   it runs only when woken. This process takes ``time.monotonic_ns()`` and calls
   ``app.wake(name)`` on an ``App`` of the same name built with the coordinator's
   URL (as an application would), and the latency is the woken pass's recorded
   start minus that instant; the next wake comes ``WAKE_SPACING_S`` after the
   previous one began, and only once its pass is on file. ``app.wake`` opens a
   coordinator for the one call and closes it (a new connection to Redis or
   PostgreSQL, a new SQLite connection plus a UDP send), so a second series
   calls ``await app.wake_async(name)`` on an ``App`` given one coordinator
   opened beforehand and kept: the event channel alone (UDP on SQLite, pub/sub on
   Redis, LISTEN/NOTIFY on PostgreSQL). ``WAKES`` wakes per series, after one
   unrecorded warm-up wake. Goal: p99 < 10 ms.

Subprocesses are killed when the benchmark ends, however it ends (and die with
it through ``PR_SET_PDEATHSIG``, armed by ``core.Runners``); the SQLite
databases live in a temporary folder and the record files in a folder under
/dev/shm, both removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis

import ostinato
from ostinato.coordinators import Coordinator, from_url
from ostinato.coordinators.postgres import lock_id

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from apps import RECORD, RECORDS_ENV, records_path  # noqa: E402
from common import (  # noqa: E402
    file_size,
    finish,
    in_ms,
    in_us,
    judge,
    median,
    percentile,
    report_end,
    set_up_process,
    shm_folder,
    sqlite_url,
    summary,
    timestamp,
    verdict,
    write_json,
)
from coordinator_apps import LEASE_ENV, WAKE_APP, WAKE_ENV, WAKE_LOOP, wake_records_path  # noqa: E402
from core import (  # noqa: E402
    REPEATS,
    STANDBY_SETTLE_S,
    STARTUP_TIMEOUT_S,
    WINDOW_S,
    Record,
    Runners,
    check_kill,
    kill_and_time,
    machine_facts,
    read_records,
    sample,
    wait_for_record,
    wait_standby,
)

RESULTS = BENCH / "results" / "coordinators.json"
APPS = BENCH / "coordinator_apps.py"

REDIS_URL = os.environ.get("OSTINATO_BENCH_REDIS", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get("OSTINATO_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

BACKENDS = ("memory", "sqlite", "redis", "postgres")
NETWORKED = ("sqlite", "redis", "postgres")  # the multi-process ones: failover and wake
SCHEMES = {"memory": "memory://", "sqlite": "sqlite://", "redis": "redis://",
           "postgres": "postgresql://"}

KILLS = 12
DEFAULT_LEASE = "10s"
REDIS_LEASE = "2s"
LEASES_S = {"sqlite": 10.0, "redis": 2.0, "postgres": 10.0}
LEASES = {"sqlite": DEFAULT_LEASE, "redis": REDIS_LEASE, "postgres": DEFAULT_LEASE}
PROBE_POLL_S = 0.02  # how often a standby's readiness is looked at
WAKES = 60  # per series
WAKE_SPACING_S = 0.05  # from one wake call's start to the next
WAKE_SETTLE_S = 0.5  # after the wake runner's first pass, before the first wake
WAKE_TIMEOUT_S = 5.0  # a woken pass that has not started by then is counted as lost
WAKE_POLL_S = 0.001  # how often the record file is looked at (the runner timestamps the pass)
DRAIN_S = 0.2  # after a series, for passes nobody asked for to show up

GOALS: dict[str, tuple[str, float]] = {
    # name: (comparison, bound)
    "ratio_to_memory": (">=", 0.5),
    "failover_p99_s": ("<", 0.5),
    "failover_redis_p99_s": ("<", LEASES_S["redis"]),
    "wake_p99_s": ("<", 0.010),
}

log = logging.getLogger("bench")


# -- namespaces on the shared servers ---------------------------------------------------------


class Namespaces:
    """The coordinator URLs of this run: a SQLite file, a Redis prefix or a PostgreSQL schema each.

    ``drop`` deletes every Redis key and PostgreSQL schema handed out, then checks
    that none is left.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.run_id = f"obench_{os.getpid()}_{secrets.token_hex(3)}"
        self.urls: dict[str, list[str]] = {"redis": [], "postgres": []}

    def url(self, backend: str, phase: str) -> str:
        name = f"{self.run_id}_{phase}"
        if backend == "memory":
            return f"memory://{name}"
        if backend == "sqlite":
            return sqlite_url(self.tmp / f"{phase}.db")
        base = REDIS_URL if backend == "redis" else POSTGRES_URL
        url = f"{base}{'&' if '?' in base else '?'}{'prefix' if backend == 'redis' else 'schema'}={name}"
        self.urls[backend].append(url)
        return url

    def drop(self) -> dict[str, Any]:
        errors = []
        for url in self.urls["redis"] + self.urls["postgres"]:
            for attempt in range(3):  # a killed runner's backend may still hold a table lock
                try:
                    asyncio.run(_drop(url))
                    break
                except Exception as exc:
                    if attempt == 2:
                        errors.append(f"dropping {url}: {exc}")
                    time.sleep(1.0)
        with redis.Redis.from_url(REDIS_URL) as client:
            left_keys = client.keys(f"{self.run_id}*")
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            left_schemas = [row[0] for row in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", [f"{self.run_id}%"]
            )]
        return {
            "redis_prefixes": [u.rsplit("=", 1)[1] for u in self.urls["redis"]],
            "postgres_schemas": [u.rsplit("=", 1)[1] for u in self.urls["postgres"]],
            "redis_keys_left": len(left_keys),
            "postgres_schemas_left": left_schemas,
            "errors": errors,
        }


async def _drop(url: str) -> None:
    coordinator = from_url(url)
    try:
        await coordinator.drop_everything()  # type: ignore[attr-defined]
    finally:
        await coordinator.close()


def server_facts() -> dict[str, Any]:
    with redis.Redis.from_url(REDIS_URL) as client:
        version = client.info("server").get("redis_version")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "redis_server": version,
        "redis_py": redis.__version__,
        "postgres_server": row[0] if row else None,
        "psycopg": psycopg.__version__,
        "redis_url": REDIS_URL,
        "postgres_url": POSTGRES_URL,
    }


# -- 1: throughput, in this process ---------------------------------------------------------


def measure_throughput(spaces: Namespaces, shm: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in (*BACKENDS, "bare")}
    for rep in range(REPEATS):
        for backend in BACKENDS:
            log.info("throughput: %s, repeat %d", backend, rep + 1)
            url = spaces.url(backend, f"tp{rep}")
            runs[backend].append(sample("ostinato", url, shm / f"throughput-{backend}-{rep}.rec"))
        log.info("throughput: bare loop, repeat %d", rep + 1)
        runs["bare"].append(sample("bare", "", shm / f"throughput-bare-{rep}.rec"))

    def rate(name: str) -> float | None:
        return median([run["passes_per_s"] for run in runs[name]])

    memory, bare = rate("memory"), rate("bare")
    result: dict[str, Any] = {"bare_passes_per_s": bare, "bare_runs": runs["bare"]}
    for backend in BACKENDS:
        mine = rate(backend)
        result[backend] = {
            "passes_per_s": mine,
            "ratio_to_memory": mine / memory if mine and memory else None,
            "ratio_to_memory_per_repeat": [
                r["passes_per_s"] / m["passes_per_s"]
                for r, m in zip(runs[backend], runs["memory"], strict=True)
            ],
            "ratio_to_bare": mine / bare if mine and bare else None,
            "gap_s": {q: median([run["gap_s"][q] for run in runs[backend]])
                      for q in ("p50", "p99", "p999", "max")},
            "runs": runs[backend],
        }
    return result


# -- a coordinator of the benchmark's own, for sync code --------------------------------------


class Probe:
    """A coordinator opened on an event loop of its own, to look at runners from sync code."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.Runner()
        self.coordinator: Coordinator = from_url(url)
        self._loop.run(self.coordinator.open())

    def runner_pids(self) -> set[int]:
        records = self._loop.run(self.coordinator.runners())
        return {int(r.label.rsplit(":", 1)[1]) for r in records}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self.coordinator.close())
        self._loop.close()


def advisory_waiters(conn: psycopg.Connection[Any], lock: int) -> int:
    """Sessions of this database waiting for the advisory lock ``lock`` (one signed bigint)."""
    unsigned = lock & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = %s AND objid = %s AND objsubid = 1",
        [unsigned >> 32, unsigned & 0xFFFF_FFFF],
    ).fetchone()
    return int(row[0]) if row else 0


def wait_networked_standby(
    proc: subprocess.Popen[bytes], probe: Probe, waiting: Callable[[], bool] | None = None
) -> None:
    """Return once ``proc`` has sent its heartbeat (and ``waiting()`` holds), then settle."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (proc.pid in probe.runner_pids() and (waiting is None or waiting())):
        if proc.poll() is not None:
            raise RuntimeError(f"standby runner {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"standby runner {proc.pid} did not ask for the lease")
        time.sleep(PROBE_POLL_S)
    time.sleep(STANDBY_SETTLE_S)


# -- 2: failover after kill -9 -------------------------------------------------------------------


@contextlib.contextmanager
def standby_check(backend: str, url: str) -> Iterator[Callable[[subprocess.Popen[bytes]], None]]:
    """A function that returns once a freshly started standby is waiting for the lease."""
    if backend == "sqlite":
        db = Path(url[len("sqlite:///"):])
        lock_dir = db.with_name(db.name + "-runners")
        yield lambda proc: wait_standby(proc, lock_dir)
        return
    probe = Probe(url)
    try:
        if backend == "redis":
            yield lambda proc: wait_networked_standby(proc, probe)
            return
        schema = url.rsplit("schema=", 1)[1]
        lock = lock_id(schema, "bench-failover:spin")
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            yield lambda proc: wait_networked_standby(
                proc, probe, lambda: advisory_waiters(conn, lock) > 0
            )
    finally:
        probe.close()


STANDBY_SIGNALS = {
    "sqlite": "runner lock file open (core.wait_standby)",
    "redis": "heartbeat in the coordinator",
    "postgres": "heartbeat in the coordinator and an ungranted advisory lock in pg_locks",
}


def measure_failover(backend: str, spaces: Namespaces, runners: Runners, shm: Path) -> dict[str, Any]:
    url = spaces.url(backend, "fo")
    folder = shm / f"failover-{backend}"
    folder.mkdir()
    target, env = f"{APPS}:failover", {RECORDS_ENV: str(folder), LEASE_ENV: LEASES[backend]}
    kills, problems = [], []
    with standby_check(backend, url) as wait_ready:
        holder = runners.start(target, url, env)
        if wait_for_record(records_path(folder, holder.pid), STARTUP_TIMEOUT_S) is None:
            raise TimeoutError(f"the first failover runner on {backend} ran no pass")
        for number in range(KILLS):
            standby = runners.start(target, url, env)
            wait_ready(standby)
            kill = kill_and_time(holder, standby, folder)
            log.info("failover on %s: kill %d of %d: %s s", backend, number + 1, KILLS,
                     kill["failover_s"])
            kills.append(kill)
            problems.extend(f"{backend}: {p}" for p in check_kill(kill))
            holder = standby
            if kill["failover_s"] is None:
                wait_for_record(records_path(folder, holder.pid), LEASES_S[backend] * 2)
        holder.kill()
        holder.wait()
    times = [k["failover_s"] for k in kills if k["failover_s"] is not None]
    gaps = sorted(k["handover_gap_s"] for k in kills if k["handover_gap_s"] is not None)
    return {
        "coordinator": backend,
        "lease": LEASES[backend],
        "lease_s": LEASES_S[backend],
        "standby_ready_when": STANDBY_SIGNALS[backend],
        "kills": len(kills),
        "takeovers": len(times),
        "failover_s": summary(times),
        "failover_s_over_lease": None if not times else max(times) / LEASES_S[backend],
        "handover_gap_s": {"p50": percentile(gaps, 0.5), "max": gaps[-1] if gaps else None},
        "samples": kills,
        "problems": problems,
    }


# -- 3: wake-up latency -------------------------------------------------------------------------


def _count(path: Path) -> int:
    return file_size(path) // RECORD.size


def _nth_record(path: Path, n: int) -> Record:
    return read_records(path)[n - 1]


def _no_pass(ctx: ostinato.Pass) -> None:
    """The body of the benchmark's copy of the wake app: only its name matters here."""


def _wake_app(coordinator: str | Coordinator) -> ostinato.App:
    app = ostinato.App(WAKE_APP, coordinator=coordinator)
    app.loop(name=WAKE_LOOP, idle=("1h", "1h"))(_no_pass)
    return app


def _wake_sample(t0: int, t1: int, record: Record | None) -> dict[str, Any]:
    return {
        "call_start_ns": t0,
        "call_s": (t1 - t0) / 1e9,
        "pass_start_ns": None if record is None else record.start,
        "latency_s": None if record is None else (record.start - t0) / 1e9,
    }


def wake_fresh(url: str, path: Path) -> list[dict[str, Any]]:
    """``app.wake(name)`` from sync code: a coordinator opened and closed per call."""
    app = _wake_app(url)
    samples = []
    for number in range(WAKES + 1):
        seen = _count(path)
        t0 = time.monotonic_ns()
        app.wake(WAKE_LOOP)
        t1 = time.monotonic_ns()
        record = wait_for_nth(path, seen + 1, WAKE_TIMEOUT_S)
        if number:  # the first one warms up
            samples.append(_wake_sample(t0, t1, record))
        time.sleep(max(0.0, t0 / 1e9 + WAKE_SPACING_S - time.monotonic()))
    return samples


async def wake_shared(url: str, path: Path) -> list[dict[str, Any]]:
    """``await app.wake_async(name)`` on an app given one open coordinator: the channel alone."""
    coordinator = from_url(url)
    await coordinator.open()
    app = _wake_app(coordinator)
    samples = []
    try:
        for number in range(WAKES + 1):
            seen = _count(path)
            t0 = time.monotonic_ns()
            await app.wake_async(WAKE_LOOP)
            t1 = time.monotonic_ns()
            deadline = time.monotonic() + WAKE_TIMEOUT_S
            while _count(path) <= seen and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(WAKE_POLL_S)
            record = _nth_record(path, seen + 1) if _count(path) > seen else None
            if number:
                samples.append(_wake_sample(t0, t1, record))
            await asyncio.sleep(max(0.0, t0 / 1e9 + WAKE_SPACING_S - time.monotonic()))
    finally:
        await coordinator.close()
    return samples


def wait_for_nth(path: Path, n: int, timeout: float) -> Record | None:
    """The ``n``-th record (from 1) in ``path``, waiting up to ``timeout`` for it."""
    deadline = time.monotonic() + timeout
    while _count(path) < n:
        if time.monotonic() > deadline:
            return None
        time.sleep(WAKE_POLL_S)
    return _nth_record(path, n)


def summarise_wakes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [s["latency_s"] for s in samples if s["latency_s"] is not None]
    return {
        "wakes": len(samples),
        "woken": len(latencies),
        "latency_s": summary(latencies),
        "call_s": summary([s["call_s"] for s in samples]),
        "samples": samples,
    }


def measure_wake(backend: str, spaces: Namespaces, runners: Runners, shm: Path) -> dict[str, Any]:
    url = spaces.url(backend, "wk")
    folder = shm / f"wake-{backend}"
    folder.mkdir()
    proc = runners.start(f"{APPS}:wake", url, {WAKE_ENV: str(folder)})
    path = wake_records_path(folder, proc.pid)
    if wait_for_record(path, STARTUP_TIMEOUT_S) is None:
        raise TimeoutError(f"the wake runner on {backend} ran no pass")
    time.sleep(WAKE_SETTLE_S)
    log.info("wake on %s: app.wake()", backend)
    before = _count(path)
    fresh = wake_fresh(url, path)
    log.info("wake on %s: app.wake_async() on a shared coordinator", backend)
    shared = asyncio.run(wake_shared(url, path))
    time.sleep(DRAIN_S)
    passes = _count(path) - before
    records = read_records(path)
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = None
    asked = 2 * (WAKES + 1)
    problems = []
    for name, series in (("app.wake()", fresh), ("wake_async, shared", shared)):
        lost = sum(1 for s in series if s["latency_s"] is None)
        if lost:
            problems.append(f"{backend}: {name}: {lost} wake(s) woke no pass within {WAKE_TIMEOUT_S}s")
    if passes != asked:
        problems.append(f"{backend}: {asked} wakes (warm-ups included) but {passes} passes")
    fences = sorted({r.fence for r in records})
    if len(fences) != 1:
        problems.append(f"{backend}: the wake loop changed hands: fences {fences}")
    return {
        "coordinator": backend,
        "channel": {"sqlite": "UDP datagrams on loopback", "redis": "pub/sub",
                    "postgres": "LISTEN/NOTIFY"}[backend],
        "app_wake": summarise_wakes(fresh),
        "shared_coordinator": summarise_wakes(shared),
        "passes_during_series": passes,
        "wakes_sent": asked,
        "sigterm_exit_code": code,
        "problems": problems,
    }


# -- report -----------------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    tp, fo, wk = result["throughput"], result["failover"], result["wake"]
    checks: list[tuple[str, str, float | None]] = [
        (f"passes/s ratio to memory://, {backend}", "ratio_to_memory", tp[backend]["ratio_to_memory"])
        for backend in ("redis", "postgres")
    ]
    for backend in NETWORKED:
        key = "failover_redis_p99_s" if backend == "redis" else "failover_p99_s"
        checks.append((f"failover after kill -9 p99, {backend}", key, fo[backend]["failover_s"]["p99"]))
    for backend in NETWORKED:
        checks.append((f"wake latency p99, app.wake(), {backend}", "wake_p99_s",
                       wk[backend]["app_wake"]["latency_s"]["p99"]))
        checks.append((f"wake latency p99, shared coordinator, {backend}", "wake_p99_s",
                       wk[backend]["shared_coordinator"]["latency_s"]["p99"]))
    return judge(checks, GOALS, bound_format="g")


def table(result: dict[str, Any]) -> str:
    m, s, tp = result["machine"], result["servers"], result["throughput"]
    fo, wk = result["failover"], result["wake"]
    met = {g["figure"]: g["met"] for g in result["goals"]}
    width = 16

    def header(title: str, backends: Sequence[str]) -> str:
        return f"{title:<46}" + "".join(f"{SCHEMES[b]:>{width}}" for b in backends)

    def row(label: str, backends: Sequence[str], cell: Callable[[str], str]) -> str:
        return f"  {label:<44}" + "".join(f"{cell(b):>{width}}" for b in backends)

    load0, load1 = m["loadavg_at_start"], m["loadavg_at_end"]
    lines = [
        f"ostinato coordinator benchmark, {result['timestamp']}",
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}",
        f"SQLite {m['sqlite']}, Redis {s['redis_server']}, PostgreSQL {s['postgres_server']}; "
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end",
        "",
        header(f"back-to-back no-op loop, {REPEATS} x {WINDOW_S:g} s, medians", BACKENDS),
        row("passes/s", BACKENDS, lambda b: f"{tp[b]['passes_per_s']:,.0f}"),
        row("ratio to memory:// (goal >= 0.5: redis, pg)", BACKENDS, lambda b: (
            f"{tp[b]['ratio_to_memory']:.3f}"
            + (f" {verdict(met[f'passes/s ratio to memory://, {b}'])}" if b in ("redis", "postgres")
               else ""))),
        row("ratio to memory://, per repeat", BACKENDS, lambda b: "/".join(
            f"{r:.2f}" for r in tp[b]["ratio_to_memory_per_repeat"])),
        row("ratio to the bare loop", BACKENDS, lambda b: f"{tp[b]['ratio_to_bare']:.3f}"),
        row("gap end->start p50 / p99, us", BACKENDS, lambda b: (
            f"{in_us(tp[b]['gap_s']['p50'])}/{in_us(tp[b]['gap_s']['p99'])}")),
        f"  (bare loop: {tp['bare_passes_per_s']:,.0f} passes/s)",
        "",
        header(f"failover after kill -9, {KILLS} kills, ms", NETWORKED),
        row("lease TTL", NETWORKED, lambda b: fo[b]["lease"]),
        row("takeovers", NETWORKED, lambda b: f"{fo[b]['takeovers']}/{fo[b]['kills']}"),
        row("p50", NETWORKED, lambda b: in_ms(fo[b]["failover_s"]["p50"])),
        row("p99 = max (goal < 500; redis: < TTL)", NETWORKED, lambda b: (
            f"{in_ms(fo[b]['failover_s']['p99'])} "
            f"{verdict(met[f'failover after kill -9 p99, {b}'])}")),
        row("min", NETWORKED, lambda b: in_ms(fo[b]["failover_s"]["min"])),
        "",
        header(f"wake-up latency, {WAKES} wakes ~{WAKE_SPACING_S * 1e3:g} ms apart, ms", NETWORKED),
    ]
    for series, label in (("app_wake", "app.wake()"), ("shared_coordinator", "shared coordinator")):
        figure = "app.wake()" if series == "app_wake" else "shared coordinator"
        lines += [
            row(f"{label}: p50", NETWORKED, lambda b, s=series: in_ms(wk[b][s]["latency_s"]["p50"])),
            row(f"{label}: p99 (goal < 10)", NETWORKED, lambda b, s=series, f=figure: (
                f"{in_ms(wk[b][s]['latency_s']['p99'])} {verdict(met[f'wake latency p99, {f}, {b}'])}")),
            row(f"{label}: max", NETWORKED, lambda b, s=series: in_ms(wk[b][s]["latency_s"]["max"])),
            row(f"{label}: call duration p50", NETWORKED,
                lambda b, s=series: in_ms(wk[b][s]["call_s"]["p50"])),
            row(f"{label}: woken", NETWORKED, lambda b, s=series: (
                f"{wk[b][s]['woken']}/{wk[b][s]['wakes']}")),
        ]
    c = result["cleanup"]
    lines += [
        "",
        f"cleanup: {len(c['redis_prefixes'])} Redis prefixes, {len(c['postgres_schemas'])} PostgreSQL "
        f"schemas dropped; {c['redis_keys_left']} keys and {len(c['postgres_schemas_left'])} schemas left",
    ]
    lines += report_end(result, RESULTS)
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------


def run() -> dict[str, Any]:
    began = time.monotonic()
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "machine": machine_facts(),
        "servers": server_facts(),
        "settings": {
            "window_s": WINDOW_S, "repeats": REPEATS, "kills": KILLS,
            "leases": LEASES, "standby_settle_s": STANDBY_SETTLE_S,
            "standby_ready_when": STANDBY_SIGNALS,
            "wakes_per_series": WAKES, "wake_warmups_per_series": 1,
            "wake_spacing_s": WAKE_SPACING_S, "wake_settle_s": WAKE_SETTLE_S,
            "wake_poll_s": WAKE_POLL_S, "wake_idle": ["1h", "1h"],
            "records": "unbuffered os.write of struct '<q' monotonic_ns (throughput: start, end; "
                       "failover and wake: '<qqqq' pid, fence, start, end)",
        },
    }
    cleanup: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ostinato-bench-")))
        tmp = tmp.resolve()
        shm = shm_folder(stack, tmp, "ostinato-bench-")
        logs = tmp / "logs"
        logs.mkdir()
        spaces = Namespaces(tmp)
        result["settings"]["run_id"] = spaces.run_id
        stack.callback(lambda: cleanup.update(spaces.drop()))  # after the runners are gone
        runners = Runners(logs)
        stack.callback(runners.close)
        result["throughput"] = measure_throughput(spaces, shm)
        result["failover"] = {b: measure_failover(b, spaces, runners, shm) for b in NETWORKED}
        result["wake"] = {b: measure_wake(b, spaces, runners, shm) for b in NETWORKED}
        runners.close()
        result["problems"] = [
            *(p for b in NETWORKED for p in result["failover"][b]["problems"]),
            *(p for b in NETWORKED for p in result["wake"][b]["problems"]),
            *runners.problems(),
        ]
    result["cleanup"] = cleanup
    if cleanup["redis_keys_left"] or cleanup["postgres_schemas_left"] or cleanup["errors"]:
        result["problems"].append(f"cleanup incomplete: {cleanup}")
    finish(result, began, goals(result))
    return result


def main() -> int:
    set_up_process()
    logging.getLogger("ostinato").setLevel(logging.WARNING)
    result = run()
    write_json(RESULTS, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
