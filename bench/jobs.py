"""ostinato on Celery and RQ workers against the naive self-enqueueing chains of the same tools.

Run it as ``.venv/bin/python bench/jobs.py`` (about three minutes on two cores); it
prints one table and writes every figure, the machine's facts and the goals to
``bench/results/jobs.json``.

The arrangements, each started with the tool's own command line, every process in a
session of its own, on the local Redis (queues in database 7, named after the run,
deleted at the end; ostinato's coordinator in database 8 under the run's prefix):

* **rq chain**: ``peers_apps/rq_chain.py``, a job that runs the pass and enqueues the
  next copy of itself (the default forking ``rq worker``), started by enqueueing it once;
* **celery chain**: ``peers_apps/celery_chain.py``, the same as a Celery task (prefork
  pool, one pool process per worker), started by sending it once;
* **ostinato on rq** / **ostinato on celery**: ``peers_apps/ostinato_jobs.py``, one
  back-to-back loop attached with ``ostinato.rq.attach`` / ``ostinato.celery.attach``
  (default budget of 1 s, lease of 10 s), on ``rq worker -w ostinato.rq.Worker`` /
  ``celery worker``; nothing is seeded by hand.

Every pass is ``peers_apps.common.run_pass`` (records ``(pid, start, end)`` on the
host's monotonic clock before and after the body), and every figure comes from those
records:

1. **Throughput**, one worker, the ``noop`` body: passes per second over ``WINDOW_S``
   (after the first pass and ``WARMUP_S``), and the end-to-start gaps (p50, p99, max).
2. **Seeded twice**, two workers, the ``sleep50`` body: the chain is started a second
   time (the naive chains: sent again; ostinato: ``attached.seed`` twice, refused while
   the chain holds the loop); the pairs of passes that overlapped in ``WINDOW_S``.
3. **kill -9**, two fresh workers, one chain, the ``sleep50`` body: a pass 5 to 35 ms
   into its 50 ms is found and its whole worker (pool process or work horse included)
   is killed; the other worker stays, and no worker is started in its place. The time
   to the next pass start anywhere, or "never" within ``RESUME_TIMEOUT_S``.
4. **Purge** (ostinato only), two fresh workers on ``jobs:purge_app`` (a loop with
   ``pause=PURGE_PAUSE_S`` and ``stall_after=PURGE_STALL_S``, the ``noop`` body): the next
   link is removed while it waits (Celery: the workers' consumers cancelled, then
   ``celery purge -f`` and the consumers added back; RQ: the link deleted from the queue's
   scheduled registry, where it waits for its pause, and the queue emptied), and the time
   from the removal to the next pass start is measured: the keeper re-forges the chain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import base_machine_facts, percentile, write_json  # noqa: E402
from peers_apps.common import RECORD  # noqa: E402

RESULTS = BENCH / "results" / "jobs.json"
REDIS = "redis://127.0.0.1:6379"
BROKER = f"{REDIS}/7"
BIN = Path(sys.executable).parent
WINDOW_S = 5.0
WARMUP_S = 1.0
START_TIMEOUT_S = 30.0
KILL_INTO_PASS_S = (0.005, 0.035)
RESUME_TIMEOUT_S = 20.0
LEASE_S = 10.0  # ostinato's default lease, not set by the bench app
PURGE_PAUSE_S = 1.0
PURGE_STALL_S = 3.0
#: The issue's goals: no overlap; resumed after kill -9 within the lease's TTL plus a second;
#: re-forged after a purge within ``stall_after`` plus a second; 10x the naive RQ chain's rate,
#: and (the same on the other worker type) 10x the naive chain's of the same tool.
GOALS = {"overlaps": 0, "resume_s": LEASE_S + 1.0, "reforged_after_purge_s": PURGE_STALL_S + 1.0,
         "passes_ratio_to_naive_rq": 10.0, "passes_ratio_to_naive_same_tool": 10.0}


def __getattr__(name: str) -> Any:
    """``jobs:purge_app`` and ``jobs:purge_celery``, the app of the purge measurement, built
    in the workers that name it (``$PEERS_KEY`` names its app and queue)."""
    if name not in ("purge_app", "purge_celery"):
        raise AttributeError(name)
    from celery import Celery
    from peers_apps.common import KEY_ENV, REDIS_ENV, run_pass, setting
    from rq import Queue

    import ostinato
    import ostinato.celery
    import ostinato.rq

    app = ostinato.App(setting(KEY_ENV))

    @app.loop(pause=PURGE_PAUSE_S, stall_after=PURGE_STALL_S)
    def spin(ctx: ostinato.Pass) -> object:
        return None if run_pass() else ostinato.IDLE

    celery = Celery("peers", broker=setting(REDIS_ENV))
    celery.conf.update(task_default_queue=setting(KEY_ENV), task_ignore_result=True,
                       broker_connection_retry_on_startup=True)
    ostinato.celery.attach(app, celery)
    ostinato.rq.attach(app, Queue(setting(KEY_ENV), connection=redis.Redis.from_url(setting(REDIS_ENV))))
    globals().update(purge_app=app, purge_celery=celery)
    return globals()[name]


@dataclass(frozen=True)
class Arrangement:
    name: str
    worker: Callable[[str, int], list[str]]
    start: Callable[[str], None]  # the naive chains are kicked once; ostinato starts by itself
    seed: Callable[[str, dict[str, str]], Any]


def _rq_naive(key: str, n: int) -> list[str]:
    return [str(BIN / "rq"), "worker", "--url", BROKER, key]


def _rq_ostinato(key: str, n: int) -> list[str]:
    return [str(BIN / "rq"), "worker", "-w", "ostinato.rq.Worker", "--url", BROKER, key]


def _celery(module: str) -> Callable[[str, int], list[str]]:
    def argv(key: str, n: int) -> list[str]:
        return [str(BIN / "celery"), "-A", module, "worker", "-c", "1", "-n", f"w{n}-{key}@%h",
                "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "warning"]
    return argv


def _kick_rq(key: str) -> None:
    from rq import Queue

    Queue(key, connection=redis.Redis.from_url(BROKER)).enqueue("peers_apps.rq_chain.link")


def _kick_celery(key: str) -> None:
    from celery import Celery

    client = Celery("peers", broker=BROKER)
    client.send_task("peers.link", queue=key)
    client.close()


def _nothing(key: str) -> None:
    return None


def _seed(system: str) -> Callable[[str, dict[str, str]], Any]:
    def seed(key: str, env: dict[str, str]) -> Any:
        code = (f"import json\nfrom peers_apps.ostinato_jobs import on_{system} as a\n"
                "print(json.dumps([a.seed('spin') is not None for _ in range(2)]))")
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=BENCH, capture_output=True,
                              text=True, timeout=60, check=True)
        return {"forged": json.loads(done.stdout.strip().splitlines()[-1])}
    return seed


def _kick_again(kick: Callable[[str], None]) -> Callable[[str, dict[str, str]], Any]:
    def seed(key: str, env: dict[str, str]) -> Any:
        kick(key)
        return {"sent_again": 1}
    return seed


ARRANGEMENTS = [
    Arrangement("rq chain", _rq_naive, _kick_rq, _kick_again(_kick_rq)),
    Arrangement("celery chain", _celery("peers_apps.celery_chain"), _kick_celery, _kick_again(_kick_celery)),
    Arrangement("ostinato on rq", _rq_ostinato, _nothing, _seed("rq")),
    Arrangement("ostinato on celery", _celery("peers_apps.ostinato_jobs:celery"), _nothing, _seed("celery")),
]


class Run:
    """One measurement: its own queue and prefix, workers, and record file."""

    def __init__(self, arrangement: Arrangement, body: str, folder: Path) -> None:
        self.arrangement, self.key = arrangement, f"jobsbench{uuid.uuid4().hex[:8]}"
        self.records = folder / f"{self.key}.bin"
        self.env = dict(os.environ, PEERS_RECORDS=str(self.records), PEERS_BODY=body, PEERS_REDIS=BROKER,
                        PEERS_KEY=self.key, OSTINATO_COORDINATOR=f"{REDIS}/8?prefix={self.key}",
                        OSTINATO_APP="peers_apps.ostinato_jobs:app", PYTHONPATH=f"{BENCH}:{ROOT / 'src'}")
        self.folder, self.workers = folder, []  # type: list[subprocess.Popen[bytes]]
        self._n = itertools.count(1)

    def add_worker(self) -> subprocess.Popen[bytes]:
        n = next(self._n)
        with (self.folder / f"{self.key}-{n}.log").open("wb") as log:
            proc = subprocess.Popen(self.arrangement.worker(self.key, n), cwd=BENCH, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        return proc

    def passes(self) -> list[tuple[int, int, int]]:
        """(pid, start, end) of every pass, end 0 for one that never ended (ns)."""
        try:
            raw = self.records.read_bytes()
        except FileNotFoundError:
            return []
        out: dict[tuple[int, int], int] = {}
        for pid, start, end in RECORD.iter_unpack(raw[: len(raw) // RECORD.size * RECORD.size]):
            if end or (pid, start) not in out:
                out[(pid, start)] = end
        return sorted(((p, s, e) for (p, s), e in out.items()), key=lambda r: r[1])

    def wait_first(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(e for _, _, e in self.passes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.arrangement.name}: no pass within {START_TIMEOUT_S:g}s")
            time.sleep(0.01)

    def close(self) -> None:
        for proc in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        for url, pattern in ((BROKER, f"*{self.key}*"), (f"{REDIS}/8", f"{self.key}:*")):
            client = redis.Redis.from_url(url)
            for name in client.scan_iter(match=pattern, count=500):
                client.delete(name)
            client.close()


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    out.append(int(child))
                    todo.append(int(child))
    return out


@contextlib.contextmanager
def running(arrangement: Arrangement, body: str, folder: Path, workers: int) -> Iterator[Run]:
    run = Run(arrangement, body, folder)
    try:
        for _ in range(workers):
            run.add_worker()
        arrangement.start(run.key)
        run.wait_first()
        yield run
    finally:
        run.close()


def gaps_s(passes: list[tuple[int, int, int]], t0: int, t1: int) -> dict[str, float | None]:
    gaps = sorted((b[1] - a[2]) / 1e9 for a, b in itertools.pairwise(passes) if a[2] and t0 <= b[1] < t1)
    return {"p50": percentile(gaps, 0.5), "p99": percentile(gaps, 0.99), "max": gaps[-1] if gaps else None}


def overlaps(passes: list[tuple[int, int, int]], t0: int, t1: int) -> int:
    inside = [(s, e or t1) for _, s, e in passes if t0 <= s < t1]
    return sum(1 for a, b in itertools.combinations(inside, 2) if a[0] < b[1] and b[0] < a[1])


def throughput(arrangement: Arrangement, folder: Path) -> dict[str, Any]:
    with running(arrangement, "noop", folder, workers=1) as run:
        time.sleep(WARMUP_S)
        t0 = time.monotonic_ns()
        time.sleep(WINDOW_S)
        t1 = time.monotonic_ns()
        time.sleep(0.2)
        passes = run.passes()
    count = sum(1 for _, s, _ in passes if t0 <= s < t1)
    return {"passes_per_s": count / WINDOW_S, "gap_s": gaps_s(passes, t0, t1)}


def seeded_twice(arrangement: Arrangement, folder: Path) -> dict[str, Any]:
    with running(arrangement, "sleep50", folder, workers=2) as run:
        time.sleep(WARMUP_S)
        seeded = arrangement.seed(run.key, run.env)
        t0 = time.monotonic_ns()
        time.sleep(WINDOW_S)
        t1 = time.monotonic_ns()
        time.sleep(0.2)
        passes = run.passes()
    count = sum(1 for _, s, _ in passes if t0 <= s < t1)
    return {"seeded_twice": seeded, "overlaps": overlaps(passes, t0, t1),
            "passes_per_s_seeded_twice": count / WINDOW_S}


def killed(arrangement: Arrangement, folder: Path) -> dict[str, Any]:
    with running(arrangement, "sleep50", folder, workers=2) as run:
        time.sleep(WARMUP_S)
        return kill9(run)


def kill9(run: Run) -> dict[str, Any]:
    low, high = (int(s * 1e9) for s in KILL_INTO_PASS_S)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = time.monotonic_ns()
        for pid, start, end in run.passes()[-4:]:
            owner = next((w for w in run.workers if pid in (w.pid, *descendants(w.pid))), None)
            if not end and low <= now - start <= high and owner is not None:
                doomed = [owner.pid, *descendants(owner.pid)]
                killed = time.monotonic_ns()
                for each in doomed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(each, signal.SIGKILL)
                owner.wait()
                run.workers.remove(owner)
                resumed = None
                until = time.monotonic() + RESUME_TIMEOUT_S
                while resumed is None and time.monotonic() < until:
                    resumed = next((s for _, s, _ in run.passes() if s > killed), None)
                    time.sleep(0.005)
                return {"killed_into_pass_s": (killed - start) / 1e9, "killed_processes": len(doomed),
                        "resume_s": None if resumed is None else (resumed - killed) / 1e9,
                        "waited_s": RESUME_TIMEOUT_S}
        time.sleep(0.002)
    return {"error": "no pass to kill within 15 s"}


def purged(system: str, folder: Path) -> dict[str, Any]:
    """Two workers on ``jobs:purge_app``; remove the chain's next link as it waits, and time the
    re-forged chain's first pass."""
    import socket

    worker = _rq_ostinato if system == "rq" else _celery("jobs:purge_celery")
    run = Run(Arrangement(f"purge on {system}", worker, _nothing, _kick_again(_nothing)), "noop", folder)
    run.env["OSTINATO_APP"] = "jobs:purge_app"
    broker = redis.Redis.from_url(BROKER)
    try:
        for _ in range(2):
            run.add_worker()
        run.wait_first()
        time.sleep(WARMUP_S)
        if system == "celery":
            removed, at = _purge_celery(run, [f"w{n}-{run.key}@{socket.gethostname()}" for n in (1, 2)])
        else:
            removed, at = _purge_rq(run, broker)
        resumed = None
        until = time.monotonic() + RESUME_TIMEOUT_S
        while resumed is None and time.monotonic() < until:
            resumed = next((s for _, s, _ in run.passes() if s > at), None)
            time.sleep(0.005)
        return {"removed_links": removed, "pause_s": PURGE_PAUSE_S, "stall_after_s": PURGE_STALL_S,
                "resume_s": None if resumed is None else (resumed - at) / 1e9,
                "waited_s": RESUME_TIMEOUT_S}
    finally:
        broker.close()
        run.close()


def _purge_celery(run: Run, nodes: list[str]) -> tuple[int, int]:
    from celery import Celery

    client = Celery("peers", broker=BROKER)
    client.conf.task_default_queue = run.key
    broker = redis.Redis.from_url(BROKER)
    try:
        client.control.cancel_consumer(run.key, destination=nodes, reply=True)
        deadline = time.monotonic() + 15
        while broker.llen(run.key) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        done = subprocess.run([str(BIN / "celery"), "-A", "jobs:purge_celery", "purge", "-f"], cwd=BENCH,
                              env=run.env, capture_output=True, text=True, timeout=60, check=True)
        at = time.monotonic_ns()
        client.control.add_consumer(run.key, destination=nodes, reply=True)
        words = done.stdout.split()
        return (int(words[1]) if words[:1] == ["Purged"] else 0), at
    finally:
        broker.close()
        client.close()


def _purge_rq(run: Run, broker: redis.Redis) -> tuple[int, int]:
    from rq import Queue
    from rq.registry import ScheduledJobRegistry

    queue = Queue(run.key, connection=broker)
    registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 15
    while registry.count < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    removed = 0
    for job_id in registry.get_job_ids():
        registry.remove(job_id, delete_job=True)
        removed += 1
    removed += queue.empty()
    return removed, time.monotonic_ns()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def main() -> None:
    began = time.monotonic()
    result: dict[str, Any] = {"machine": base_machine_facts(), "window_s": WINDOW_S, "goals": GOALS,
                              "arrangements": {}}
    with tempfile.TemporaryDirectory(prefix="ostinato-jobs-bench-", dir="/dev/shm") as folder:
        for arrangement in ARRANGEMENTS:
            print(f"{arrangement.name} ...", flush=True)
            figures = throughput(arrangement, Path(folder))
            figures.update(seeded_twice(arrangement, Path(folder)))
            figures["kill9"] = killed(arrangement, Path(folder))
            if arrangement.name.startswith("ostinato on "):
                figures["purge"] = purged(arrangement.name.removeprefix("ostinato on "), Path(folder))
            result["arrangements"][arrangement.name] = figures
    naive_rq = result["arrangements"]["rq chain"]["passes_per_s"]
    for name in ("ostinato on rq", "ostinato on celery"):
        figures = result["arrangements"][name]
        figures["passes_ratio_to_naive_rq"] = figures["passes_per_s"] / naive_rq if naive_rq else None
        naive = result["arrangements"][name.removeprefix("ostinato on ") + " chain"]["passes_per_s"]
        figures["passes_ratio_to_naive_same_tool"] = figures["passes_per_s"] / naive if naive else None
        resume, ratio = figures["kill9"].get("resume_s"), figures["passes_ratio_to_naive_rq"] or 0
        reforged = figures["purge"].get("resume_s")
        figures["goals_met"] = {
            "overlaps": figures["overlaps"] == GOALS["overlaps"],
            "resume_s": resume is not None and resume <= GOALS["resume_s"],
            "reforged_after_purge_s": reforged is not None and reforged <= GOALS["reforged_after_purge_s"],
            "passes_ratio_to_naive_rq": ratio >= GOALS["passes_ratio_to_naive_rq"],
            "passes_ratio_to_naive_same_tool": (figures["passes_ratio_to_naive_same_tool"] or 0)
            >= GOALS["passes_ratio_to_naive_same_tool"],
        }
    result["took_s"] = time.monotonic() - began
    write_json(RESULTS, result)
    print(f"{'arrangement':<20} {'passes/s':>9} {'gap p99':>9} {'gap max':>9} "
          f"{'overlaps (seeded twice)':>24} {'resume after kill -9':>21}")
    for name, f in result["arrangements"].items():
        resume = f["kill9"].get("resume_s")
        p99, top = (f["gap_s"][q] for q in ("p99", "max"))
        print(f"{name:<20} {f['passes_per_s']:>9.0f} {_ms(p99):>9} {_ms(top):>9} "
              f"{f['overlaps']:>24} {'never' if resume is None else f'{resume:.2f} s':>21}")
    for name in ("ostinato on rq", "ostinato on celery"):
        purge = result["arrangements"][name]["purge"]
        print(f"{name}: re-forged {purge['resume_s'] or 'never'} s after the purge "
              f"(stall_after {PURGE_STALL_S:g} s); goals met: {result['arrangements'][name]['goals_met']}")
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
