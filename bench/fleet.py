"""Benchmark of a fleet: N loops of one ``keys=`` loop spread over R runners.

Run it as ``.venv/bin/python bench/fleet.py --loops 10000 --runners 10`` (``--backends``
to pick among ``redis`` and ``postgres``, ``--lease`` for the lease TTL, ``--out`` for
another file than ``bench/results/fleet.json``). For each coordinator it:

1. starts R ``ostinato run`` processes of an app with one loop of N keys, whose body
   returns ``ostinato.IDLE`` (``idle=("1s", "30s")``, or ``--idle``) and appends a record of each pass
   (key, fence, pid, start and end on ``CLOCK_MONOTONIC``) to its runner's file;
2. reads every lease (``loops()``) every half second until all N are held and every
   runner holds within one loop of N / R, rounded down or up (``balanced_in_s``; each
   wait gives up after two minutes);
3. kills one runner with SIGKILL and reads until every one of its loops is held by
   another runner (``failover_s``: the last of them, as read; a read of every lease takes
   seconds at this size, so the figure that counts is ``failover_runs_s``, from the pass
   records: when each of those loops first ran on another runner; the goal is the TTL
   plus 2 s);
   Each runner has a liveness folder of its own, as on separate hosts: no standby learns
   of the kill from a lock the kernel frees on a shared host.
4. once the killed runner's heartbeat has run out, starts a new runner and reads until
   it holds its share to within one loop (``join_s``, as read; ``join_runs_s``, from the
   pass records: when it had run passes of that many loops; the goal is 30 s);
5. stops every runner with SIGTERM, and checks the pass records: no two passes of one
   key overlap in time (``overlaps``, from the records, a killed runner's unfinished
   pass counted up to its kill), and fences never go down from one pass of a key to the
   next (``fences_down``).

Goals, from the issue that set them, at 100,000 loops over 10 runners: balanced to within
one loop of the fair share; a killed runner's loops all running elsewhere within the
TTL plus 2 s; a new runner holding its share within 30 s; never two passes of a loop at
once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ostinato.coordinators import from_url

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import base_machine_facts, set_up_process, timestamp, write_json  # noqa: E402
from coordinators import Namespaces  # noqa: E402

log = logging.getLogger("bench.fleet")
RESULTS = BENCH / "results" / "fleet.json"
BACKENDS = ("redis", "postgres")
LIMIT_S = 120.0
#: How long one read of every lease may take.
READ_TIMEOUT_S = 60.0
#: Once balanced, how long each runner's CPU is measured.
STEADY_S = 30.0
#: How often every lease is read, at least: a read of 100,000 leases loads the server and
#: this process for seconds, so the pause between reads grows with the loops (``read_every``).
READ_EVERY = 0.5
#: A runner's heartbeat counts it alive this long (``ostinato.host.RUNNER_TTL``): the new
#: runner joins once the killed one no longer counts, so the join is measured on its own.
RUNNER_TTL = 5.0

APP = '''
import os
import time

import ostinato

app = ostinato.App("fleet", grace="5s")
size = int(os.environ["FLEET_LOOPS"])
records = os.open(os.environ["FLEET_RECORDS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
pid = os.getpid()


@app.loop(keys=lambda: [f"k{i}" for i in range(size)], refresh="1h",
          idle=tuple(os.environ["FLEET_IDLE"].split(",")), lease=os.environ["FLEET_LEASE"])
async def member(ctx):
    start = time.monotonic_ns()
    os.write(records, f"{ctx.key} {ctx.fence} {pid} {start} {time.monotonic_ns()}\\n".encode())
    return ostinato.IDLE
'''


class Fleet:
    """The runner processes of one coordinator's run."""

    def __init__(self, url: str, folder: Path, loops: int, lease: float, idle: str = "1s,30s") -> None:
        self.url, self.folder, self.loops, self.lease, self.idle = url, folder, loops, lease, idle
        (folder / "fleet_app.py").write_text(APP)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.killed: dict[int, int] = {}  # pid -> CLOCK_MONOTONIC ns of the kill

    def start(self) -> int:
        n = len(self.procs)
        # A liveness folder of its own (``ostinato.coordinators.liveness``): to the others it
        # runs on another host, so a standby learns of its death as across hosts, not from
        # the kernel of a shared one.
        host = self.folder / f"host-{n}"
        host.mkdir(mode=0o700)
        env = {**os.environ, "FLEET_LOOPS": str(self.loops), "FLEET_LEASE": f"{self.lease:g}s",
               "FLEET_IDLE": self.idle,
               "FLEET_RECORDS": str(self.folder / f"passes-{n}.log"), "XDG_RUNTIME_DIR": str(host)}
        with (self.folder / f"runner-{n}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ostinato", "run", "fleet_app:app", "--coordinator", self.url,
                 "--log-level", "warning"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
            )
        self.procs[proc.pid] = proc
        return proc.pid

    def kill(self, pid: int) -> None:
        self.killed[pid] = time.monotonic_ns()
        os.kill(pid, signal.SIGKILL)
        self.procs[pid].wait()

    def stop(self) -> dict[int, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[int, int | None] = {}
        for pid, proc in self.procs.items():
            try:
                codes[pid] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[pid] = proc.wait()
        return codes

    def live(self) -> list[int]:
        return [pid for pid, proc in self.procs.items() if proc.poll() is None]


async def _holders(url: str) -> dict[str, str | None]:
    # Reading 100,000 leases from a busy server takes longer than a runner's call may.
    coordinator = from_url(f"{url}{'&' if '?' in url else '?'}timeout={READ_TIMEOUT_S:g}")
    await coordinator.open()
    try:
        return {r.key: r.holder for r in await coordinator.loops() if "[" in r.key}
    finally:
        await coordinator.close()


def holders(url: str) -> dict[str, str | None]:
    return asyncio.run(_holders(url))


def by_pid(claims: dict[str, str | None]) -> collections.Counter[int]:
    return collections.Counter(int(h.rpartition(":")[2]) for h in claims.values() if h)


def balanced(counts: collections.Counter[int], runners: list[int], loops: int) -> bool:
    share = loops / len(runners)
    return (sum(counts[pid] for pid in runners) == loops
            and all(math.floor(share) - 1 <= counts[pid] <= math.ceil(share) + 1 for pid in runners))


def wait_for(
    what: str, check: Any, limit: float | None = None, every: float = READ_EVERY
) -> tuple[float | None, Any]:
    limit = LIMIT_S if limit is None else limit
    began = time.monotonic()
    seen = None
    while time.monotonic() - began < limit:
        seen = check()
        if seen[0]:
            return time.monotonic() - began, seen[1]
        time.sleep(every)
    log.warning("%s: not within %.0f s (%s)", what, limit, seen[1] if seen else None)
    return None, seen[1] if seen else None


def read_passes(folder: Path, killed: dict[int, int]) -> dict[str, list[tuple[int, int, int, int]]]:
    """Every recorded pass, by key: (start, end, pid, fence), in start order."""
    passes: dict[str, list[tuple[int, int, int, int]]] = collections.defaultdict(list)
    for path in folder.glob("passes-*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                key, fence, pid, start, end = parts[0], *map(int, parts[1:])
                passes[key].append((start, end, pid, fence))
            elif len(parts) == 4:  # a killed runner's pass cut short: open until its kill
                key, fence, pid, start = parts[0], *map(int, parts[1:])
                passes[key].append((start, killed.get(pid, start), pid, fence))
    for runs in passes.values():
        runs.sort()
    return passes


def check_records(passes: dict[str, list[tuple[int, int, int, int]]]) -> dict[str, Any]:
    overlaps = fences_down = 0
    for runs in passes.values():
        for (_, end, pid, fence), (start2, _, pid2, fence2) in itertools.pairwise(runs):
            overlaps += start2 < end and pid2 != pid
            fences_down += fence2 < fence
    return {"passes": sum(len(r) for r in passes.values()), "keys_run": len(passes),
            "overlaps": overlaps, "fences_down": fences_down}


def measure(
    backend: str, url: str, folder: Path, loops: int, runners: int, lease: float,
    settle_limit: float = LIMIT_S, idle: str = "1s,30s",
) -> dict[str, Any]:
    fleet = Fleet(url, folder, loops, lease, idle)
    every = max(READ_EVERY, loops / 20_000)  # 5 s between reads at 100,000 loops
    result: dict[str, Any] = {"backend": backend, "loops": loops, "runners": runners, "lease_s": lease,
                              "idle": idle}
    lost_by_phase: dict[str, int] = {}
    theirs: set[str] = set()
    victim = newcomer = joined_ns = 0
    try:
        for _ in range(runners):
            fleet.start()

        def all_balanced() -> tuple[bool, Any]:
            counts = by_pid(holders(url))
            return balanced(counts, fleet.live(), loops), sorted(counts.values())

        result["balanced_in_s"], result["held_by_runner"] = wait_for(
            "balanced", all_balanced, settle_limit, every)
        lost_by_phase["start"] = lost_lines(folder)
        result["steady"] = steady_use(fleet.live(), STEADY_S)
        counts = by_pid(holders(url))
        victim = max(fleet.live(), key=lambda pid: counts[pid])
        theirs = {key for key, holder in holders(url).items() if holder and holder.endswith(f":{victim}")}
        result["victim_held"] = len(theirs)
        fleet.kill(victim)
        killed_at = time.monotonic()

        timeline: list[tuple[float, int]] = []

        def moved() -> tuple[bool, Any]:
            claims = holders(url)
            left = 0
            for key in theirs:
                holder = claims.get(key)
                left += holder is None or holder.endswith(f":{victim}")
            timeline.append((round(time.monotonic() - killed_at, 2), left))
            return left == 0, left

        took, left = wait_for("failover", moved, None, every)
        result["failover_s"] = None if took is None else time.monotonic() - killed_at
        result["failover_left"] = left
        # How many of the killed runner's loops were still its own at each read: the shape
        # says whether failover waits on one step (silence, then a burst) or trickles.
        result["failover_timeline"] = timeline
        result["failover_goal_s"] = lease + 2.0
        result["rebalanced_in_s"], result["held_after_failover"] = wait_for(
            "rebalanced", all_balanced, None, every)
        lost_by_phase["failover"] = lost_lines(folder)
        time.sleep(max(0.0, killed_at + RUNNER_TTL + 1.0 - time.monotonic()))
        joined_ns = time.monotonic_ns()
        newcomer = fleet.start()

        def joined() -> tuple[bool, Any]:
            counts = by_pid(holders(url))
            share = loops / len(fleet.live())
            return counts[newcomer] >= math.floor(share) - 1, counts[newcomer]

        result["join_s"], result["newcomer_held"] = wait_for("join", joined, None, every)
        result["join_goal_s"] = 30.0
        result["balanced_after_join_s"], result["held_after_join"] = wait_for(
            "balanced", all_balanced, None, every)
        lost_by_phase["join"] = lost_lines(folder)
    finally:
        result["exit_codes"] = sorted(set((fleet.stop()).values()), key=str)
    passes = read_passes(folder, fleet.killed)
    result.update(check_records(passes))
    if victim in fleet.killed:
        result.update(moved_runs(passes, theirs, victim, fleet.killed[victim]))
    if newcomer:
        result["join_runs_s"] = joined_runs(passes, newcomer, joined_ns, loops // runners - 1)
        result["join_runs_timeline"] = joined_timeline(passes, newcomer, joined_ns, loops // runners - 1)
    result["leases_lost_lines"] = lost_lines(folder)
    result["leases_lost_reasons"] = lost_reasons(folder)
    # Counted at the end of each phase: start-up, failover, join, then the stop.
    lost_by_phase["stop"] = result["leases_lost_lines"]
    totals = list(lost_by_phase.values())
    result["leases_lost_lines_by_phase"] = dict(
        zip(lost_by_phase, [b - a for a, b in zip([0, *totals], totals, strict=False)], strict=True)
    )
    return result


def steady_use(pids: list[int], seconds: float) -> dict[str, Any]:
    """Each runner's CPU (share of one core) over ``seconds`` and its RSS at the end."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick

    before, began = {pid: cpu(pid) for pid in pids}, time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - began
    shares = sorted(round((cpu(pid) - before[pid]) / took * 100, 1) for pid in pids)
    rss = sorted(
        int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if line.startswith("VmRSS:"))) // 1024
        for pid in pids
    )
    return {"seconds": round(took, 1), "runner_cpu_pct": shares, "runner_rss_mb": rss,
            "fleet_cpu_cores": round(sum(shares) / 100, 2)}


def lost_reasons(folder: Path) -> dict[str, int]:
    """``lease lost`` lines by the reason each gives."""
    reasons: collections.Counter[str] = collections.Counter()
    for path in folder.glob("runner-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "lease lost (fence" in line:
                reasons[line.partition("): ")[2].strip()[:80]] += 1
    return dict(reasons.most_common())


def lost_lines(folder: Path) -> int:
    """``lease lost`` lines in every runner's log so far."""
    return sum(path.read_text(errors="replace").count("lease lost") for path in folder.glob("runner-*.log"))


def joined_runs(
    passes: dict[str, list[tuple[int, int, int, int]]], newcomer: int, started_ns: int, share: int
) -> float | None:
    """From the pass records: how long after the new runner was started it had run passes
    of ``share`` different loops (its share to within one)."""
    firsts = sorted(
        next(start for start, _, pid, _ in runs if pid == newcomer)
        for runs in passes.values() if any(pid == newcomer for _, _, pid, _ in runs)
    )
    return (firsts[share - 1] - started_ns) / 1e9 if len(firsts) >= share else None


def joined_timeline(
    passes: dict[str, list[tuple[int, int, int, int]]], newcomer: int, started_ns: int, share: int
) -> dict[str, float]:
    """From the pass records: how long after its start the new runner had run passes of its
    first loop, of a tenth, half and nine tenths of its share, and of all of it: the shape
    says whether joining waits on one step or trickles."""
    firsts = sorted(
        next(start for start, _, pid, _ in runs if pid == newcomer)
        for runs in passes.values() if any(pid == newcomer for _, _, pid, _ in runs)
    )
    marks = {"first": 1, "10%": share // 10, "50%": share // 2, "90%": share * 9 // 10, "all": share}
    out: dict[str, float] = {name: round((firsts[n - 1] - started_ns) / 1e9, 2)
                             for name, n in marks.items() if 0 < n <= len(firsts)}
    # Loops that changed runner more than once after the join (passed back and forth).
    out["moved_twice_or_more"] = sum(
        1 for runs in passes.values()
        if len([pid for i, (start, _, pid, _) in enumerate(runs) if start > started_ns
                and (i == 0 or runs[i - 1][2] != pid)]) > 1
    )
    return out


def moved_runs(
    passes: dict[str, list[tuple[int, int, int, int]]], theirs: set[str], victim: int, killed_ns: int
) -> dict[str, Any]:
    """From the pass records: how long after the kill each of the killed runner's loops
    first ran on another runner (the failover a user sees; the holder reads above are as
    slow as reading every lease)."""
    delays = []
    for lease in theirs:
        key = lease[lease.index("[") + 1:-1]  # fleet:member[k12] is recorded as k12
        elsewhere = (start for start, _, pid, _ in passes.get(key, []) if pid != victim and start > killed_ns)
        first = next(elsewhere, None)
        if first is not None:
            delays.append((first - killed_ns) / 1e9)
    delays.sort()
    return {
        "failover_runs_s": {
            "p50": delays[len(delays) // 2] if delays else None,
            "max": delays[-1] if delays else None,
            "ran_elsewhere": len(delays), "of": len(theirs),
        }
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=100_000)
    parser.add_argument("--runners", type=int, default=10)
    parser.add_argument("--lease", type=float, default=10.0, help="lease TTL in seconds")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--idle", default="1s,30s",
                        help="the loop's idle wait after a pass that found nothing: first,most")
    parser.add_argument("--settle-limit", type=float, default=600.0,
                        help="how long to wait for the first balance, in seconds")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="copy the runners' logs here (by coordinator)")
    args = parser.parse_args()
    set_up_process()
    logging.getLogger("ostinato").setLevel(logging.WARNING)
    result: dict[str, Any] = {"timestamp": timestamp(), "machine": base_machine_facts(), "runs": []}
    cleanup: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ostinato-fleet-")))
        spaces = Namespaces(tmp)
        stack.callback(lambda: cleanup.update(spaces.drop()))
        for backend in args.backends.split(","):
            folder = tmp / backend
            folder.mkdir()
            log.info("%s: %d loops over %d runners", backend, args.loops, args.runners)
            try:
                row = measure(backend, spaces.url(backend, "fleet"), folder, args.loops,
                              args.runners, args.lease, args.settle_limit, args.idle)
            except Exception as exc:  # the coordinator gave out: that is the finding
                row = {"backend": backend, "loops": args.loops, "runners": args.runners,
                       "error": f"{type(exc).__name__}: {exc}"}
            log.info("%s", row)
            if args.keep_logs is not None:
                shutil.copytree(folder, args.keep_logs / backend, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("host-*", "passes-*"))
            result["runs"].append(row)
    result["cleanup"] = cleanup
    write_json(args.out, result)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
