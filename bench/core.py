"""Core benchmark of ostinato: pass throughput, gaps between passes, failover, idle cost.

Run it as ``.venv/bin/python bench/core.py`` (or ``make bench``). One run takes
about two and a half minutes, prints a table and writes every raw figure, the
machine's facts, the goals and whether each was met to ``bench/results/core.json``.

What is measured, and how:

1. **Throughput.** A back-to-back loop (``@app.loop``, no pacing) with a sync
   body that only appends two 8-byte records, its start and its end
   (``time.monotonic_ns()``), to a file under /dev/shm opened once, unbuffered.
   ostinato hosts it in this process (``async with app.running(...)``) on
   ``memory://`` and on ``sqlite://``; once the first pass is on file, a window
   of ``WINDOW_S`` seconds is timed. Next to it a bare loop calls the very same
   function for the same time. Passes are counted from the records (a pass
   whose start lies in the window counts), never from ostinato's counters.
   Each measurement is repeated ``REPEATS`` times; medians are reported, and the
   figure is the ratio ostinato/bare.
2. **Gap.** From the same records: the time from one pass's end to the next
   pass's start (p50, p99, p99.9, max) inside the window.
3. **Failover.** Two ``ostinato run`` processes of ``bench/apps.py:failover``
   share a SQLite coordinator (lease 10 s, the default). Each pass appends pid,
   fence, start and end to a per-process file. Once a standby is waiting (it
   holds its runner lock, seen in ``/proc/<pid>/fd``), the holder is killed with
   SIGKILL; the failover time runs from ``time.monotonic_ns()`` just before
   ``os.kill`` to the start of the first pass recorded by the standby
   (CLOCK_MONOTONIC is shared by the processes of one host). A fresh runner then
   becomes the next standby; this is done ``KILLS`` times.
4. **Idle cost.** One ``ostinato run`` process hosting ``IDLE_LOOPS`` loops that
   all return ``ostinato.IDLE`` (sync bodies; async bodies as a second figure)
   on SQLite. Once every loop is held (per ``ostinato status --json``) and
   ``IDLE_SETTLE_S`` more seconds have passed, its CPU time (utime + stime from
   ``/proc/<pid>/stat``, all threads) is read over ``IDLE_WINDOW_S`` seconds and
   scaled to CPU seconds per minute and to % of one core.

Subprocesses are killed when the benchmark ends, however it ends (and die with
it through ``PR_SET_PDEATHSIG``); the databases live in a temporary folder and
the record files in a folder under /dev/shm, both removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ostinato

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from apps import IDLE_LOOPS, RECORD, RECORDS_ENV, records_path  # noqa: E402
from common import (  # noqa: E402
    base_machine_facts,
    death_signal,
    file_size,
    finish,
    in_ms,
    in_us,
    int64_columns,
    judge,
    logged_problems,
    median,
    percentile,
    proc_stat,
    read_structs,
    report_end,
    set_up_process,
    shm_folder,
    sqlite_url,
    summary,
    timestamp,
    verdict,
    write_json,
)

RESULTS = BENCH / "results" / "core.json"
APPS = BENCH / "apps.py"

WINDOW_S = 3.0  # each throughput measurement
REPEATS = 3
BARE_BATCH = 100  # bare-loop calls between two looks at the clock
KILLS = 12
STANDBY_SETTLE_S = 0.3  # after a standby holds its runner lock, before the kill
FAILOVER_TIMEOUT_S = 25.0  # a TTL of 10 s plus slack
IDLE_SETTLE_S = 5.0
IDLE_WINDOW_S = 30.0
STARTUP_TIMEOUT_S = 30.0

GOALS: dict[str, tuple[str, float]] = {
    # name: (comparison, bound)
    "throughput_ratio": (">=", 0.1),
    "gap_p99_s": ("<", 0.001),
    "failover_p50_s": ("<", 0.5),
    "idle_cpu_pct_of_core": ("<", 1.0),
}

_STAMP = struct.Struct("<q")

log = logging.getLogger("bench")


# -- machine facts ---------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """The common facts and the clock tick that /proc counts the idle CPU time in."""
    return {**base_machine_facts(), "clock_ticks_per_s": os.sysconf("SC_CLK_TCK")}


# -- 1 and 2: throughput and gaps, in this process ---------------------------------------------


def make_work(fd: int) -> Callable[..., None]:
    """The body both sides call: append its start and its end, 8 bytes each, to ``fd``."""
    write, pack, now = os.write, _STAMP.pack, time.monotonic_ns

    def work(_ctx: object = None) -> None:
        write(fd, pack(now()))
        write(fd, pack(now()))

    return work


def read_stamps(path: Path) -> tuple[array[int], array[int]]:
    """The (starts, ends) a ``work`` function appended to ``path``."""
    starts, ends = int64_columns(path.read_bytes(), 2)
    return starts, ends


def analyse(path: Path, t0: int, t1: int) -> dict[str, Any]:
    """Passes that started in [t0, t1) and the gaps from each one's end to the next start."""
    starts, ends = read_stamps(path)
    first, last = bisect_left(starts, t0), bisect_left(starts, t1)
    passes = last - first
    gaps = sorted(s - e for s, e in zip(starts[first + 1:last], ends[first:last - 1], strict=True))
    seconds = (t1 - t0) / 1e9

    def gap(q: float) -> float | None:
        value = percentile(gaps, q)
        return None if value is None else value / 1e9

    return {
        "window_s": seconds,
        "passes": passes,
        "passes_per_s": passes / seconds,
        "gap_s": {"p50": gap(0.5), "p99": gap(0.99), "p999": gap(0.999),
                  "max": gaps[-1] / 1e9 if gaps else None},
    }


async def _wait_for_bytes(fd: int, size: int) -> None:
    """Return once ``fd``'s file holds ``size`` bytes (the caller bounds the wait)."""
    while os.fstat(fd).st_size < size:  # noqa: ASYNC110 - a file has no event to await
        await asyncio.sleep(0.001)


async def _ostinato_window(url: str, fd: int, seconds: float) -> tuple[int, int]:
    app = ostinato.App("bench-core")
    app.loop(name="minimal")(make_work(fd))
    async with app.running(coordinator=url):
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            await _wait_for_bytes(fd, 16)
        t0 = time.monotonic_ns()
        await asyncio.sleep(seconds)
        t1 = time.monotonic_ns()
    return t0, t1


def _bare_window(fd: int, seconds: float) -> tuple[int, int]:
    work = make_work(fd)
    now = time.monotonic_ns
    t0 = now()
    t1 = t0 + int(seconds * 1e9)
    while now() < t1:
        for _ in range(BARE_BATCH):
            work()
    return t0, t1


@contextlib.contextmanager
def record_file(path: Path) -> Iterator[int]:
    """An unbuffered append-only descriptor on ``path``; the file is gone afterwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def sample(side: str, url: str, path: Path) -> dict[str, Any]:
    """One timed window of ``side`` ("ostinato" or "bare"), analysed from its records."""
    with record_file(path) as fd:
        if side == "ostinato":
            t0, t1 = asyncio.run(_ostinato_window(url, fd, WINDOW_S))
        else:
            t0, t1 = _bare_window(fd, WINDOW_S)
        return analyse(path, t0, t1)


def summarise_throughput(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(side: str, pick: Callable[[dict[str, Any]], float | None]) -> float | None:
        return median([pick(run) for run in runs[side]])

    ostinato_rate = med("ostinato", lambda r: r["passes_per_s"])
    bare_rate = med("bare", lambda r: r["passes_per_s"])
    ratio = ostinato_rate / bare_rate if ostinato_rate and bare_rate else None
    return {
        "ostinato_passes_per_s": ostinato_rate,
        "bare_passes_per_s": bare_rate,
        "ratio": ratio,
        "ratio_per_repeat": [
            o["passes_per_s"] / b["passes_per_s"]
            for o, b in zip(runs["ostinato"], runs["bare"], strict=True)
        ],
        "ostinato_gap_s": {
            q: med("ostinato", lambda r, q=q: r["gap_s"][q]) for q in ("p50", "p99", "p999", "max")
        },
        "bare_gap_s": {
            q: med("bare", lambda r, q=q: r["gap_s"][q]) for q in ("p50", "p99", "p999", "max")
        },
        "runs": runs,
    }


def measure_throughput(tmp: Path, shm: Path) -> dict[str, Any]:
    urls = {"memory": "memory://bench-{rep}", "sqlite": sqlite_url(tmp / "throughput-{rep}.db")}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        backend: {"ostinato": [], "bare": []} for backend in urls
    }
    for rep in range(REPEATS):
        for backend, url in urls.items():
            for side in ("ostinato", "bare"):
                log.info("throughput: %s on %s, repeat %d", side, backend, rep + 1)
                path = shm / f"throughput-{backend}-{side}-{rep}.rec"
                runs[backend][side].append(sample(side, url.format(rep=rep), path))
    return {backend: summarise_throughput(runs[backend]) for backend in urls}


# -- runner subprocesses --------------------------------------------------------------------------


class Runners:
    """``ostinato run`` subprocesses, each logging to its own file, all killed by ``close``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self._arm = death_signal()
        self._cli = Path(sys.executable).with_name("ostinato")
        if not self._cli.exists():
            found = shutil.which("ostinato")
            if found is None:
                raise SystemExit("cannot find the ostinato command next to this Python")
            self._cli = Path(found)

    def start(self, target: str, url: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_path = self.logs / f"runner-{len(self.procs):03d}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [str(self._cli), "run", target, "--coordinator", url, "--log-level", "warning"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})}, preexec_fn=self._arm,
            )
        self.procs.append(proc)
        return proc

    def status(self, url: str) -> list[dict[str, Any]]:
        done = subprocess.run(
            [str(self._cli), "status", "--json", "--coordinator", url],
            capture_output=True, text=True, timeout=30, check=True,
        )
        loops: list[dict[str, Any]] = json.loads(done.stdout)["loops"]
        return loops

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def problems(self) -> list[str]:
        """Error lines and tracebacks the runners logged."""
        return logged_problems(self.logs.glob("runner-*.log"), ("ERROR", "Traceback", "Error:"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``, from /proc/<pid>/stat."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches summed over the threads of ``pid``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split(":", 1)[1])
    return total


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


# -- 3: failover after kill -9 ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    pid: int
    fence: int
    start: int
    end: int


def read_records(path: Path) -> list[Record]:
    """The complete records in a failover file (a killed writer may leave half of one)."""
    return [Record(*fields) for fields in read_structs(path, RECORD)]


def wait_for_record(path: Path, timeout: float, poll: float = 0.002) -> Record | None:
    """The first complete record in ``path``, waiting up to ``timeout`` for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if file_size(path) >= RECORD.size:
            return read_records(path)[0]
        time.sleep(poll)
    return None


def holds_runner_lock(pid: int, lock_dir: Path) -> bool:
    """Whether ``pid`` has a file of ``lock_dir`` open: it took its runner lock and asked once."""
    with contextlib.suppress(OSError):
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(entry).startswith(f"{lock_dir}/"):
                    return True
    return False


def wait_standby(proc: subprocess.Popen[bytes], lock_dir: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not holds_runner_lock(proc.pid, lock_dir):
        if proc.poll() is not None:
            raise RuntimeError(f"standby runner {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"standby runner {proc.pid} did not ask for the lease")
        time.sleep(0.01)
    time.sleep(STANDBY_SETTLE_S)


def kill_and_time(
    holder: subprocess.Popen[bytes], standby: subprocess.Popen[bytes], shm: Path
) -> dict[str, Any]:
    """Kill -9 the holder; time how long until the standby's first pass starts."""
    old, new = records_path(shm, holder.pid), records_path(shm, standby.pid)
    size = file_size(old)
    time.sleep(0.02)
    holder_running = file_size(old) > size
    standby_early = file_size(new) > 0
    kill_ns = time.monotonic_ns()
    os.kill(holder.pid, signal.SIGKILL)
    first = wait_for_record(new, FAILOVER_TIMEOUT_S)
    holder.wait()
    last = read_records(old)[-1] if file_size(old) >= RECORD.size else None
    result: dict[str, Any] = {
        "holder_pid": holder.pid,
        "standby_pid": standby.pid,
        "holder_was_running": holder_running,
        "standby_ran_before_kill": standby_early,
        "kill_ns": kill_ns,
        "failover_s": None if first is None else (first.start - kill_ns) / 1e9,
        "handover_gap_s": None,
        "old_fence": None if last is None else last.fence,
        "new_fence": None if first is None else first.fence,
    }
    if first is not None and last is not None:
        result["handover_gap_s"] = (first.start - last.end) / 1e9
    return result


def check_kill(sample: dict[str, Any]) -> list[str]:
    """What went wrong in one kill, if anything."""
    where = f"failover kill of {sample['holder_pid']}"
    problems = []
    if sample["failover_s"] is None:
        problems.append(f"{where}: no takeover within {FAILOVER_TIMEOUT_S}s")
    elif sample["failover_s"] < 0:
        problems.append(f"{where}: the standby started a pass before the kill")
    if not sample["holder_was_running"]:
        problems.append(f"{where}: the killed holder was not running passes")
    if sample["standby_ran_before_kill"]:
        problems.append(f"{where}: the standby {sample['standby_pid']} ran passes before the kill")
    old, new = sample["old_fence"], sample["new_fence"]
    if old is not None and new is not None and new <= old:
        problems.append(f"{where}: fence did not grow ({old} -> {new})")
    return problems


def measure_failover(runners: Runners, tmp: Path, shm: Path) -> dict[str, Any]:
    db = tmp / "failover.db"
    url, lock_dir = sqlite_url(db), db.with_name(db.name + "-runners")
    target, env = f"{APPS}:failover", {RECORDS_ENV: str(shm)}
    holder = runners.start(target, url, env)
    if wait_for_record(records_path(shm, holder.pid), STARTUP_TIMEOUT_S) is None:
        raise TimeoutError("the first failover runner ran no pass")
    kills, problems = [], []
    for number in range(KILLS):
        standby = runners.start(target, url, env)
        wait_standby(standby, lock_dir)
        kill = kill_and_time(holder, standby, shm)
        log.info("failover: kill %d of %d: %s s", number + 1, KILLS, kill["failover_s"])
        kills.append(kill)
        problems.extend(check_kill(kill))
        holder = standby
        if kill["failover_s"] is None:
            wait_for_record(records_path(shm, holder.pid), FAILOVER_TIMEOUT_S)
    times = sorted(k["failover_s"] for k in kills if k["failover_s"] is not None)
    gaps = sorted(k["handover_gap_s"] for k in kills if k["handover_gap_s"] is not None)
    return {
        "coordinator": "sqlite",
        "lease_s": 10.0,
        "kills": len(kills),
        "takeovers": len(times),
        "failover_s": summary(times),
        "handover_gap_s": {"p50": percentile(gaps, 0.5), "max": gaps[-1] if gaps else None},
        "samples": kills,
        "problems": problems,
    }


# -- 4: idle CPU ------------------------------------------------------------------------------------


def _held(loops: list[dict[str, Any]], app: str) -> int:
    return sum(1 for loop in loops if loop["app"] == app and loop["holder"])


def _passes(loops: list[dict[str, Any]], app: str) -> int:
    return sum(int(loop["passes"]) for loop in loops if loop["app"] == app)


def measure_idle(runners: Runners, tmp: Path, attr: str, app: str) -> dict[str, Any]:
    url = sqlite_url(tmp / f"{attr}.db")
    proc = runners.start(f"{APPS}:{attr}", url)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    # status never creates a coordinator: ask once the runner has made the file.
    while not (tmp / f"{attr}.db").exists() or _held(runners.status(url), app) < IDLE_LOOPS:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the idle runner did not take all {IDLE_LOOPS} leases")
        time.sleep(0.5)
    time.sleep(IDLE_SETTLE_S)
    passes0 = _passes(runners.status(url), app)
    cpu0, switches0, t0 = cpu_seconds(proc.pid), context_switches(proc.pid), time.monotonic()
    time.sleep(IDLE_WINDOW_S)
    cpu1, switches1, t1 = cpu_seconds(proc.pid), context_switches(proc.pid), time.monotonic()
    passes1 = _passes(runners.status(url), app)
    threads = thread_count(proc.pid)
    stop = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = None
    window, used = t1 - t0, cpu1 - cpu0
    return {
        "coordinator": "sqlite",
        "loops": IDLE_LOOPS,
        "body": "async" if "async" in attr else "sync",
        "settle_s": IDLE_SETTLE_S,
        "window_s": window,
        "cpu_s": used,
        "cpu_s_per_min": used * 60 / window,
        "pct_of_core": used / window * 100,
        "context_switches_per_s": (switches1 - switches0) / window,
        "idle_passes_per_s": (passes1 - passes0) / window,
        "threads": threads,
        "sigterm_exit_code": code,
        "sigterm_stop_s": time.monotonic() - stop if code is not None else None,
    }


# -- report -------------------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    tp, fo, idle = result["throughput"], result["failover"], result["idle_cpu"]
    checks: list[tuple[str, str, float | None]] = []
    for backend in ("memory", "sqlite"):
        checks.append((f"throughput ratio ostinato/bare, {backend}", "throughput_ratio",
                       tp[backend]["ratio"]))
        checks.append((f"gap end->start p99, {backend}", "gap_p99_s",
                       tp[backend]["ostinato_gap_s"]["p99"]))
    checks.append(("failover after kill -9 p50, sqlite", "failover_p50_s", fo["failover_s"]["p50"]))
    for body in ("sync", "async"):
        checks.append((f"idle CPU, {IDLE_LOOPS} {body} loops, sqlite", "idle_cpu_pct_of_core",
                       idle[body]["pct_of_core"]))
    return judge(checks, GOALS)


def table(result: dict[str, Any]) -> str:
    m, tp = result["machine"], result["throughput"]
    fo, idle = result["failover"], result["idle_cpu"]
    met = {g["figure"]: g["met"] for g in result["goals"]}
    lines = [
        f"ostinato core benchmark, {result['timestamp']}",
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}",
        "",
        f"{f'back-to-back sync loop, {REPEATS} x {WINDOW_S:g} s, medians':<50}"
        f"{'memory://':>14} {'sqlite://':>14}",
    ]

    def row(label: str, cell: Callable[[dict[str, Any], str], str]) -> None:
        lines.append(f"  {label:<48}{cell(tp['memory'], 'memory'):>14} "
                     f"{cell(tp['sqlite'], 'sqlite'):>14}")

    row("ostinato passes/s", lambda t, b: f"{t['ostinato_passes_per_s']:,.0f}")
    row("bare loop passes/s", lambda t, b: f"{t['bare_passes_per_s']:,.0f}")
    row("ratio ostinato/bare (goal >= 0.1)", lambda t, b: (
        f"{t['ratio']:.3f} {verdict(met[f'throughput ratio ostinato/bare, {b}'])}"))
    row("gap end->start p50, us", lambda t, b: in_us(t["ostinato_gap_s"]["p50"]))
    row("gap end->start p99, us (goal < 1000)", lambda t, b: (
        f"{in_us(t['ostinato_gap_s']['p99'])} {verdict(met[f'gap end->start p99, {b}'])}"))
    row("gap end->start p99.9 / max, us", lambda t, b: (
        f"{in_us(t['ostinato_gap_s']['p999'])}/{in_us(t['ostinato_gap_s']['max'])}"))
    row("bare loop gap p50 / p99, us", lambda t, b: (
        f"{in_us(t['bare_gap_s']['p50'])}/{in_us(t['bare_gap_s']['p99'])}"))
    f = fo["failover_s"]
    lines += [
        "",
        f"failover after kill -9, sqlite://, lease 10 s, {fo['kills']} kills, "
        f"{fo['takeovers']} takeovers",
        f"  p50 {in_ms(f['p50'])} ms   p99 {in_ms(f['p99'])} ms   max {in_ms(f['max'])} ms   "
        f"min {in_ms(f['min'])} ms   (goal p50 < 500 ms: "
        f"{verdict(met['failover after kill -9 p50, sqlite'])})",
        "",
        f"idle runner, {IDLE_LOOPS} loops returning IDLE, sqlite://, "
        f"{IDLE_WINDOW_S:g} s window after {IDLE_SETTLE_S:g} s settle",
    ]
    for body in ("sync", "async"):
        i = idle[body]
        lines.append(
            f"  {body:<5} bodies: {i['cpu_s_per_min']:.3f} CPU s/min = {i['pct_of_core']:.3f} % "
            f"of one core (goal < 1 %: {verdict(met[f'idle CPU, {IDLE_LOOPS} {body} loops, sqlite'])});"
            f" {i['idle_passes_per_s']:.1f} passes/s, {i['context_switches_per_s']:.0f} "
            f"switches/s, {i['threads']} threads"
        )
    lines += report_end(result, RESULTS)
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------


def run() -> dict[str, Any]:
    began = time.monotonic()
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "machine": machine_facts(),
        "settings": {
            "window_s": WINDOW_S, "repeats": REPEATS, "kills": KILLS,
            "standby_settle_s": STANDBY_SETTLE_S, "idle_loops": IDLE_LOOPS,
            "idle_settle_s": IDLE_SETTLE_S, "idle_window_s": IDLE_WINDOW_S,
            "records": "unbuffered os.write of struct '<q' monotonic_ns, start then end",
        },
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ostinato-bench-")))
        tmp = tmp.resolve()
        shm = shm_folder(stack, tmp, "ostinato-bench-")
        logs = tmp / "logs"
        logs.mkdir()
        runners = Runners(logs)
        stack.callback(runners.close)
        result["throughput"] = measure_throughput(tmp, shm)
        result["failover"] = measure_failover(runners, tmp, shm)
        result["idle_cpu"] = {
            "sync": measure_idle(runners, tmp, "idle", "bench-idle"),
            "async": measure_idle(runners, tmp, "idle_async", "bench-idle-async"),
        }
        runners.close()
        result["problems"] = result["failover"]["problems"] + runners.problems()
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
