"""Benchmark of ``isolation="process"``: the cost of a pass in a child, and how fast a loop
comes back after a pass that hangs or crashes.

Run it as ``.venv/bin/python bench/isolation.py``. One run takes well under a
minute, prints a table and writes every raw figure, the machine's facts, the
goal and whether it was met to ``bench/results/isolation.json``.

Every loop is hosted in this process (``async with app.running(...)``) on a
``sqlite://`` coordinator in a temporary folder, one app at a time; the apps
live in ``bench/isolation_apps.py`` at module level, so that an isolated loop's
child can import them again. Each pass appends one record (pid, pass number,
start, end as ``time.monotonic_ns()``) to a file under /dev/shm with one
unbuffered ``os.write``; every figure is computed from these records, never from
ostinato's counters (those are only read as a cross-check). CLOCK_MONOTONIC is
shared by the processes of one host, so a child's records and the runner's
compare directly.

What is measured, and how:

1. **Overhead per pass.** A back-to-back loop whose sync body only takes two
   timestamps and writes its record, run in the runner (a thread of this
   process) and with ``isolation="process"`` (in a child that is reused pass
   after pass). Once the first pass is on file, a window of ``WINDOW_S``
   seconds is timed; for each pair of consecutive passes that both started in
   it, the start-to-start interval is the wall time of one pass as the runner
   cycles: the body, ostinato's bookkeeping and, isolated, the round trip over
   the pipe to the child and back. Also reported: the gap from a pass's end to
   the next one's start (everything but the body). Each side runs ``REPEATS``
   times, alternating; medians over the repeats are reported, and the
   difference isolated minus in-process. Goal: an isolated no-op pass under
   1 ms at p50.
2. **Timeout to next pass.** A loop with ``isolation="process",
   timeout="200ms", error_backoff=("10ms", "10ms")`` whose body records its
   start and then sleeps for an hour. Each pass is killed at its timeout
   (SIGTERM, which ends the sleeping child at once) and the next pass runs in a
   new child. The figure is the interval between consecutive pass starts minus
   the 200 ms timeout, over ``HANG_PASSES`` passes. It contains: how late the
   runner notices the timeout (it looks every 20 ms, ``isolation.TICK``), the
   kill and reaping of the child, the error backoff (5 to 10 ms: the bounds
   are jittered down to half), and the start of a fresh interpreter that
   imports ostinato and the app (spawned as soon as the old child is gone,
   so its start overlaps the backoff). For comparison, the same with an
   ``async def`` body (``await asyncio.sleep``) in the runner, which is
   cancelled at its timeout: there the figure is the cancellation plus the
   backoff.
3. **Crash to next pass.** A loop with ``isolation="process",
   error_backoff=("10ms", "10ms")`` whose body records its start and then
   sends itself SIGSEGV. The figure is the next pass's start minus the crashed
   pass's start, over ``CRASHES`` crashes. It contains the crashed pass itself
   (a write and a kill, microseconds), the runner noticing the death (end of
   file on the pipe, at once), reaping the child, logging the failure, the
   backoff, and the start of a fresh interpreter, again overlapping the
   backoff. No core file is written on this machine when ``RLIMIT_CORE`` is 0
   and ``core_pattern`` is not a pipe; both are recorded with the machine facts.

As a reference for 2 and 3, the cold start of an interpreter doing what a new
child does before it can take a pass (import ostinato, load the app by its
path) is timed ``COLD_STARTS`` times: from just before ``subprocess.Popen`` to
a timestamp the interpreter prints once the app is loaded.

No subprocess outlives the benchmark: ostinato's children are retired when each
app stops, a hung child arms ``PR_SET_PDEATHSIG`` before it sleeps, and after
each measurement any child process of this one still alive is reported as a
problem and killed by its pid. The databases live in a temporary folder and the
record files in a folder under /dev/shm, both removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import ostinato
from ostinato import isolation

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    base_machine_facts,
    file_size,
    finish,
    in_ms,
    in_us,
    int64_columns,
    judge,
    median,
    percentile,
    proc_stat,
    read_structs,
    report_end,
    set_up_process,
    shm_folder,
    sqlite_url,
    timestamp,
    verdict,
    write_json,
)

RESULTS = BENCH / "results" / "isolation.json"
#: Must match ``isolation_apps.RECORDS_ENV`` (checked once the module is imported).
RECORDS_ENV = "OSTINATO_BENCH_ISOLATION_RECORDS"

WINDOW_S = 3.0  # each no-op measurement
REPEATS = 3
HANG_PASSES = 21  # 20 timeouts: intervals between 21 consecutive pass starts
CRASHES = 20
COLD_STARTS = 10
STARTUP_TIMEOUT_S = 30.0
EPISODE_LIMIT_S = 40.0  # a hang or crash measurement gives up after this long
POLL_S = 0.005

GOALS: dict[str, tuple[str, float]] = {
    # name: (comparison, bound)
    "isolated_noop_pass_p50_s": ("<", 0.001),
}

log = logging.getLogger("bench")


# -- small helpers -----------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, min, p50, p90, p99, p99.9 and max of ``values`` (seconds)."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "min": ordered[0] if ordered else None,
        "p50": percentile(ordered, 0.5),
        "p90": percentile(ordered, 0.9),
        "p99": percentile(ordered, 0.99),
        "p999": percentile(ordered, 0.999),
        "max": ordered[-1] if ordered else None,
    }


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# -- machine facts ---------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine_facts() -> dict[str, Any]:
    """The common facts, and what decides whether a crashed child writes a core file."""
    core_soft, core_hard = resource.getrlimit(resource.RLIMIT_CORE)
    return {
        **base_machine_facts(trim_status=False),
        "core_pattern": _read("/proc/sys/kernel/core_pattern"),
        "rlimit_core": [core_soft, core_hard],
        "isolation_tick_s": isolation.TICK,
        "isolation_kill_grace_s": isolation.KILL_GRACE,
    }


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    pid: int
    number: int
    start: int
    end: int  # 0: the pass never got there


def read_records(path: Path, record: Any) -> list[Record]:
    """The complete records in ``path`` (a killed writer may leave half of one)."""
    return [Record(*fields) for fields in read_structs(path, record)]


def _clear(path: Path) -> None:
    """Empty a record file (writers hold it with O_APPEND, so they go on at the new end)."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(path, 0)


async def _wait_for_size(path: Path, size: int, limit_s: float) -> bool:
    """Whether ``path`` grew to ``size`` bytes within ``limit_s`` seconds."""
    try:
        async with asyncio.timeout(limit_s):
            while file_size(path) < size:  # noqa: ASYNC110 - a file has no event to await
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        return False
    return True


# -- what ostinato logged, and processes left behind -----------------------------------------------


class LogBook(logging.Handler):
    """Keeps what ostinato logs at WARNING and above, by measurement, off the console."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.phase = "setup"
        self.records: dict[str, list[logging.LogRecord]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records.setdefault(self.phase, []).append(record)

    def summary(self, phase: str) -> dict[str, Any]:
        """How many records ``phase`` logged, by level, and its distinct messages (a few)."""
        records = self.records.get(phase, [])
        levels: dict[str, int] = {}
        texts: dict[str, int] = {}
        for record in records:
            levels[record.levelname] = levels.get(record.levelname, 0) + 1
            text = re.sub(r"\b\d+\b", "N", record.getMessage())
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                why = getattr(exc, "summary", None) or str(exc).splitlines()[0]
                text += f" <- {type(exc).__name__}: {why}"
            texts[text] = texts.get(text, 0) + 1
        return {
            "count": len(records),
            "by_level": levels,
            "messages": [{"text": t, "count": n} for t, n in list(texts.items())[:8]],
        }


def child_pids() -> list[int]:
    """The live processes whose parent is this one."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = proc_stat(int(entry.name))
            if int(fields[1]) == me and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def reap_leftovers(where: str) -> list[str]:
    """Kill (by pid) any child process still alive after ``where``; say so."""
    problems = []
    for pid in child_pids():
        problems.append(f"{where}: child process {pid} was still alive after the app stopped; killed")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return problems


def keeper_stats(runner: Any) -> dict[str, Any]:
    """ostinato's own count of the loop's passes and errors (a cross-check only)."""
    (keeper,) = runner.keepers.values()
    stats = keeper.stats
    return {"passes": stats.passes, "errors": stats.errors,
            "last_error": getattr(stats, "last_error", None)}


# -- 1: overhead per pass ----------------------------------------------------------------------


async def _noop_window(app: ostinato.App, url: str, path: Path, record: Any,
                       seconds: float) -> tuple[int, int, dict[str, Any]]:
    began = time.monotonic()
    async with app.running(coordinator=url) as runner:
        if not await _wait_for_size(path, record.size, STARTUP_TIMEOUT_S):
            raise TimeoutError(f"{app.name}: no pass within {STARTUP_TIMEOUT_S}s")
        t0 = time.monotonic_ns()
        first_pass_s = t0 / 1e9 - began
        await asyncio.sleep(seconds)
        t1 = time.monotonic_ns()
        stats = keeper_stats(runner)
        stopping = time.monotonic()
    stats.update(first_record_seen_after_s=first_pass_s, stop_s=time.monotonic() - stopping)
    return t0, t1, stats


def read_columns(path: Path) -> tuple[array[int], array[int], array[int], array[int]]:
    """The pids, pass numbers, starts and ends in a record file, as four columns."""
    pids, numbers, starts, ends = int64_columns(path.read_bytes(), 4)
    return pids, numbers, starts, ends


def analyse_noop(path: Path, t0: int, t1: int) -> dict[str, Any]:
    """Start-to-start intervals, body times and end-to-start gaps of passes started in [t0, t1).

    One process writes the file (the runner's thread, or the one child), so the
    starts are in order.
    """
    pids, numbers, starts, ends = read_columns(path)
    first, last = bisect_left(starts, t0), bisect_left(starts, t1)
    follows = [i for i in range(first, last - 1)
               if numbers[i + 1] == numbers[i] + 1 and pids[i + 1] == pids[i]]
    seconds = (t1 - t0) / 1e9
    return {
        "window_s": seconds,
        "passes": last - first,
        "passes_per_s": (last - first) / seconds,
        "pids": sorted(set(pids[first:last])),
        "pass_s": spread([(starts[i + 1] - starts[i]) / 1e9 for i in follows]),
        "body_s": spread([(ends[i] - starts[i]) / 1e9 for i in range(first, last)]),
        "gap_s": spread([(starts[i + 1] - ends[i]) / 1e9 for i in follows]),
    }


def measure_noop(apps: ModuleType, tmp: Path, shm: Path, book: LogBook) -> dict[str, Any]:
    sides = {"inprocess": apps.noop_inprocess, "process": apps.noop_process}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    problems: list[str] = []
    for rep in range(REPEATS):
        for side, app in sides.items():
            name = f"noop_{side}"
            book.phase = name
            log.info("no-op pass: %s, repeat %d", side, rep + 1)
            path = apps.records_path(shm, name)
            _clear(path)
            url = sqlite_url(tmp / f"{name}-{rep}.db")
            t0, t1, stats = asyncio.run(_noop_window(app, url, path, apps.RECORD, WINDOW_S))
            if apps.RECORD.size != 32 or apps.RECORD.format != "<qqqq":
                raise RuntimeError("bench/isolation_apps.py writes another record format")
            run = analyse_noop(path, t0, t1)
            run["ostinato_stats"] = stats
            _clear(path)
            runs[side].append(run)
            problems += reap_leftovers(f"no-op {side}, repeat {rep + 1}")
            if side == "inprocess" and run["pids"] != [os.getpid()]:
                problems.append(f"no-op in-process, repeat {rep + 1}: passes ran in pids {run['pids']}")
            if side == "process" and (len(run["pids"]) != 1 or os.getpid() in run["pids"]):
                problems.append(f"no-op isolated, repeat {rep + 1}: passes ran in pids {run['pids']}, "
                                "not in one reused child")
    for side in sides:
        if book.records.get(f"noop_{side}"):
            problems.append(f"no-op {side}: ostinato logged {book.summary(f'noop_{side}')}")

    def med(side: str, what: str, q: str) -> float | None:
        return median([run[what][q] for run in runs[side]])

    summary: dict[str, Any] = {}
    for side in sides:
        summary[side] = {
            "passes_per_s": median([run["passes_per_s"] for run in runs[side]]),
            **{f"{what}_s": {q: med(side, f"{what}_s", q) for q in ("p50", "p99", "p999", "max")}
               for what in ("pass", "body", "gap")},
        }
    summary["difference_s"] = {
        q: difference(summary["process"]["pass_s"][q], summary["inprocess"]["pass_s"][q])
        for q in ("p50", "p99")
    }
    summary["runs"] = runs
    summary["problems"] = problems
    return summary


# -- 2 and 3: a pass that hangs or crashes, and the next one ---------------------------------------


async def _episodes(app: ostinato.App, url: str, path: Path, record: Any,
                    passes: int) -> tuple[float, dict[str, Any]]:
    """Host ``app`` until ``passes`` passes are on file; return how long it took."""
    began = time.monotonic()
    async with app.running(coordinator=url) as runner:
        reached = await _wait_for_size(path, passes * record.size, EPISODE_LIMIT_S)
        took = time.monotonic() - began
        stats = keeper_stats(runner)
        stopping = time.monotonic()
    stats["stop_s"] = time.monotonic() - stopping
    if not reached:
        log.warning("%s: only %d passes in %ss", app.name, file_size(path) // record.size, EPISODE_LIMIT_S)
    return took, stats


def measure_episodes(apps: ModuleType, tmp: Path, shm: Path, book: LogBook, name: str,
                     passes: int, subtract_s: float) -> dict[str, Any]:
    """Start-to-start intervals of ``passes`` consecutive failing passes, minus ``subtract_s``."""
    book.phase = name
    log.info("%s: %d passes", name, passes)
    path = apps.records_path(shm, name)
    _clear(path)
    took, stats = asyncio.run(_episodes(getattr(apps, name), sqlite_url(tmp / f"{name}.db"), path,
                                        apps.RECORD, passes))
    records = read_records(path, apps.RECORD)
    _clear(path)
    problems = reap_leftovers(name)
    samples = []
    for a, b in itertools.pairwise(records):
        interval = (b.start - a.start) / 1e9
        samples.append({"pid": a.pid, "next_pid": b.pid, "number": a.number,
                        "start_ns": a.start, "next_start_ns": b.start,
                        "interval_s": interval, "figure_s": interval - subtract_s})
    if len(records) < passes:
        problems.append(f"{name}: {len(records)} passes recorded of the {passes} wanted "
                        f"within {EPISODE_LIMIT_S}s")
    figures = [s["figure_s"] for s in samples]
    return {
        "passes": len(records),
        "samples_n": len(samples),
        "subtracted_s": subtract_s,
        "hosted_s": took,
        "figure_s": spread(figures),
        "interval_s": spread([s["interval_s"] for s in samples]),
        "distinct_pids": len({r.pid for r in records}),
        "ostinato_stats": stats,
        "logged": book.summary(name),
        "samples": samples,
        "problems": problems,
    }


def check_fresh_children(result: dict[str, Any], name: str) -> None:
    """Each pass after a killed or crashed one must run in a new child, never in the runner."""
    for s in result["samples"]:
        if s["next_pid"] == s["pid"] or s["next_pid"] == os.getpid():
            result["problems"].append(f"{name}: pass {s['number'] + 1} ran in pid {s['next_pid']}, "
                                      f"after pass {s['number']} in pid {s['pid']}")


def check_not_early(result: dict[str, Any], name: str) -> None:
    """No pass may be ended before its timeout: every figure is >= 0."""
    low = result["figure_s"]["min"]
    if low is not None and low < 0:
        result["problems"].append(f"{name}: a pass was followed by the next {-low * 1e3:.1f} ms "
                                  "before its timeout ran out")


# -- reference: a child interpreter's cold start -----------------------------------------------------


def measure_cold_start(target: str) -> dict[str, Any]:
    """From just before Popen to the moment an interpreter has imported ostinato and the app."""
    code = ("import sys, time\nfrom ostinato.cli import load_app\nload_app(sys.argv[1])\n"
            "print(time.monotonic_ns())")
    times = []
    for _ in range(COLD_STARTS):
        before = time.monotonic_ns()
        done = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True,
                              timeout=STARTUP_TIMEOUT_S, check=True)
        times.append((int(done.stdout.split()[-1]) - before) / 1e9)
    return {"what": "Popen -> 'import ostinato.cli; load_app(target)' done, in a new interpreter",
            "target": target, "seconds": spread(times), "samples": times}


# -- report -------------------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [("isolated no-op pass, start to start, p50", "isolated_noop_pass_p50_s",
               result["noop"]["process"]["pass_s"]["p50"])]
    return judge(checks, GOALS)


def table(result: dict[str, Any]) -> str:
    m, noop = result["machine"], result["noop"]
    met = {g["key"]: g["met"] for g in result["goals"]}
    lines = [
        f"ostinato isolation benchmark, {result['timestamp']}",
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}",
        f"load average (1 min) {m['loadavg_at_start'][0]:.2f} at start, "
        f"{m['loadavg_at_end'][0]:.2f} at end: other work on the machine shifts every figure",
        "",
        f"{f'back-to-back no-op loop, sqlite://, {REPEATS} x {WINDOW_S:g} s, medians':<52}"
        f"{'in-process':>12} {'isolated':>12} {'difference':>12}",
    ]

    def row(label: str, pick: Callable[[dict[str, Any]], float | None], fmt: Callable[..., str],
            diff: bool = True) -> None:
        a, b = pick(noop["inprocess"]), pick(noop["process"])
        lines.append(f"  {label:<50}{fmt(a):>12} {fmt(b):>12} "
                     f"{fmt(difference(b, a)) if diff else '':>12}")

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    row("passes/s", lambda s: s["passes_per_s"], rate, diff=False)
    row("pass, start to start, p50, us", lambda s: s["pass_s"]["p50"], in_us)
    row("pass, start to start, p99, us", lambda s: s["pass_s"]["p99"], in_us)
    row("pass, start to start, p99.9, us", lambda s: s["pass_s"]["p999"], in_us)
    row("body (inside the pass), p50, us", lambda s: s["body_s"]["p50"], in_us)
    row("gap end -> next start, p50, us", lambda s: s["gap_s"]["p50"], in_us)
    row("gap end -> next start, p99, us", lambda s: s["gap_s"]["p99"], in_us)
    lines.append(f"  goal: isolated pass p50 < 1000 us: {verdict(met['isolated_noop_pass_p50_s'])}")

    def episode(label: str, e: dict[str, Any]) -> None:
        f = e["figure_s"]
        lines.append(f"  {label:<50}p50 {in_ms(f['p50']):>7} ms  p99 {in_ms(f['p99']):>7} ms  "
                     f"min {in_ms(f['min']):>7}  max {in_ms(f['max']):>7}  (n={f['n']})")

    t, c = result["timeout"], result["crash"]
    lines += ["", "timeout 200 ms, error_backoff 10 ms: next pass start - pass start - 200 ms"]
    episode("isolation='process', sync time.sleep (new child)", t["process"])
    episode("in-process async def, cancelled", t["async"])
    lines += ["", "crash (SIGSEGV in the child), error_backoff 10 ms: next start - crashed start"]
    episode("isolation='process' (new child)", c)
    cold = result["child_cold_start"]["seconds"]
    lines += ["", f"reference: new interpreter importing ostinato + the app, {cold['n']} runs",
              f"  p50 {in_ms(cold['p50'])} ms  min {in_ms(cold['min'])} ms  max {in_ms(cold['max'])} ms"]
    lines += report_end(result, RESULTS)
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------


def load_apps(shm: Path) -> ModuleType:
    """Import ``isolation_apps`` with its record folder set (it opens its files at import)."""
    os.environ[RECORDS_ENV] = str(shm)  # inherited by the children, which import it again
    import isolation_apps

    if isolation_apps.RECORDS_ENV != RECORDS_ENV:
        raise RuntimeError("bench/isolation_apps.py names another records variable")
    return isolation_apps


@contextlib.contextmanager
def log_book() -> Iterator[LogBook]:
    """Route ostinato's log records to a ``LogBook`` while the measurements run."""
    book = LogBook()
    logger = logging.getLogger("ostinato")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(book)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield book
    finally:
        logger.removeHandler(book)
        logger.setLevel(level)
        logger.propagate = propagate


def run() -> dict[str, Any]:
    began = time.monotonic()
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "machine": machine_facts(),
        "settings": {
            "coordinator": "sqlite", "window_s": WINDOW_S, "repeats": REPEATS,
            "hang_passes": HANG_PASSES, "crashes": CRASHES, "cold_starts": COLD_STARTS,
            "records": "one unbuffered os.write per pass of struct '<qqqq': pid, pass number, "
                       "start, end (monotonic_ns; end 0 when the pass never ends)",
        },
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ostinato-bench-"))).resolve()
        shm = shm_folder(stack, tmp, "ostinato-bench-isolation-")
        apps = load_apps(shm)
        stack.callback(apps.close_records)
        book = stack.enter_context(log_book())
        timeout_s = apps.HANG_TIMEOUT_S
        result["settings"].update(timeout_s=timeout_s, error_backoff=list(apps.ERROR_BACKOFF))
        result["noop"] = measure_noop(apps, tmp, shm, book)
        result["timeout"] = {
            "process": measure_episodes(apps, tmp, shm, book, "hang_process", HANG_PASSES, timeout_s),
            "async": measure_episodes(apps, tmp, shm, book, "hang_async", HANG_PASSES, timeout_s),
        }
        result["crash"] = measure_episodes(apps, tmp, shm, book, "crash_process", CRASHES + 1, 0.0)
        book.phase = "cold_start"
        result["child_cold_start"] = measure_cold_start(apps.crash_process.locate())
    for name, episodes in (("hang_process", result["timeout"]["process"]),
                           ("crash_process", result["crash"])):
        check_fresh_children(episodes, name)
    for name, episodes in (("hang_process", result["timeout"]["process"]),
                           ("hang_async", result["timeout"]["async"])):
        check_not_early(episodes, name)
    result["problems"] = (result["noop"]["problems"] + result["timeout"]["process"]["problems"]
                          + result["timeout"]["async"]["problems"] + result["crash"]["problems"])
    finish(result, began, goals(result))
    return result


def main() -> int:
    set_up_process()
    result = run()
    write_json(RESULTS, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
