"""What the Celery and RQ tests share: real workers as subprocesses, and the passes they recorded.

Every worker runs in a session of its own, so a test can kill a whole worker (its
pool processes or work horse included) the way a host crash would. Each test has
an app, a queue and a coordinator prefix named after it, so runs of these tests
at the same time (by others on the machine) never meet: the queue lives in Redis
database 7 and the coordinator in database 8, and a test deletes its own keys
when it ends, nothing else.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.history import PassRecord, overlaps

REDIS = "redis://127.0.0.1:6379"
BROKER = f"{REDIS}/7"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


def redis_answers() -> None:
    """Skip when no Redis answers."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(BROKER)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis answers at {REDIS}")
    finally:
        client.close()


def forget_keys(env: dict[str, str]) -> None:
    """Delete the test's own keys: its queue (and RQ's keys for it, or its RabbitMQ queue) and
    its coordinator prefix."""
    import redis

    name = env["JOBS_APP"]
    if env["JOBS_BROKER"].startswith("amqp"):
        from kombu import Connection

        with Connection(env["JOBS_BROKER"]) as conn:
            conn.default_channel.queue_delete(env["JOBS_QUEUE"])
    if env["JOBS_COORDINATOR"].startswith("postgresql"):
        import psycopg

        with psycopg.connect(env["JOBS_COORDINATOR"].partition("?")[0], autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    for url, pattern in ((BROKER, f"*{name}*"), (f"{REDIS}/8", f"{name}:*")):
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=pattern, count=500):
                client.delete(key)
        finally:
            client.close()


def rabbitmq_answers() -> str:
    """The local RabbitMQ's URL; skip when none answers."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure to connect means no RabbitMQ here
        pytest.skip(f"no RabbitMQ answers at {RABBITMQ}: {exc}")
    return RABBITMQ


def coordinator_url(kind: str, tmp_path: Path, name: str) -> str:
    """A coordinator of ``kind`` for the test's app (SQLite in the test's folder, PostgreSQL
    in a schema named after the test, dropped by ``forget_keys``)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.db'}"
    if kind == "postgresql":
        pytest.importorskip("psycopg")
        from tests.servers import postgres_url

        return f"{postgres_url()}?schema={name}"
    return f"{REDIS}/8?prefix={name}"


def environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a test's workers: its own app name, coordinator prefix and records."""
    name = f"jobs{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update(
        JOBS_APP=name,
        JOBS_COORDINATOR=f"{REDIS}/8?prefix={name}",
        JOBS_BROKER=BROKER,
        JOBS_QUEUE=name,
        JOBS_RECORDS=str(tmp_path / "passes.txt"),
        PYTHONPATH=str(ROOT),
    )
    env.update(settings)
    return env


class Workers:
    """The worker processes of one test; every one is killed when the test ends."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.procs: list[subprocess.Popen[bytes]] = []
        self._count = itertools.count(1)

    def start(self, *command: str, **settings: str) -> subprocess.Popen[bytes]:
        """Start ``command`` with the test's environment and ``settings`` on top."""
        log = self.tmp_path / f"worker{next(self._count)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env={**self.env, **settings}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.args} ---\n" + p.log.read_text(errors="replace")  # type: ignore[attr-defined]
                         for p in self.procs)

    def kill_all(self) -> None:
        for proc in self.procs:
            for pid in descendants(proc.pid):  # an RQ work horse has a process group of its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


@contextlib.contextmanager
def workers(tmp_path: Path, env: dict[str, str]) -> Iterator[Workers]:
    running = Workers(tmp_path, env)
    try:
        yield running
    finally:
        running.kill_all()
        forget_keys(env)


def passes(env: dict[str, str]) -> list[PassRecord]:
    """Every pass on file, in start order (``end`` is ``None`` for a pass that never ended)."""
    path = Path(env["JOBS_RECORDS"])
    if not path.exists():
        return []
    started: dict[tuple[int, str], PassRecord] = {}
    for line in path.read_text().splitlines():
        kind, pid, fence, start, *end = line.split()
        key = (int(pid), start)
        if kind == "S":
            started.setdefault(key, PassRecord(int(pid), int(fence), float(start), None))
        elif kind == "E" and end:
            started[key] = PassRecord(int(pid), int(fence), float(start), float(end[0]))
    return sorted(started.values(), key=lambda r: r.start)


def cron_passes(env: dict[str, str]) -> list[tuple[float, float]]:
    """``(slot, wall start)`` of every ``cron=`` pass on file, in start order."""
    path = Path(env["JOBS_RECORDS"] + ".cron")
    if not path.exists():
        return []
    return sorted(tuple(map(float, line.split())) for line in path.read_text().splitlines())  # type: ignore[misc]


def on_cron_slots(env: dict[str, str], every: float) -> None:
    """Assert that each ``cron=`` pass stood for its own slot, one slot of ``every`` seconds
    after the other (none missed, none run twice), and started at its slot, not before it
    and less than half a slot after it."""
    slots = cron_passes(env)
    assert [b - a for (a, _), (b, _) in itertools.pairwise(slots)] == pytest.approx(
        [every] * (len(slots) - 1), abs=1e-3), slots
    late = [start - slot for slot, start in slots]
    assert all(0 <= each < every / 2 for each in late), late


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scraped(ports: list[int], name: str, **labels: str) -> float:
    """The sum over the workers serving metrics on ``ports`` of metric ``name`` with ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            total += sum(sample.value for sample in family.samples if sample.name == name
                         and all(sample.labels.get(k) == v for k, v in labels.items()))
    return total


def wait_until(what: Callable[[], object], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return bool(what())


def gaps(records: list[PassRecord]) -> list[float]:
    """From the end of each finished pass to the start of the next."""
    return [b.start - a.end for a, b in itertools.pairwise(records) if a.end is not None]


def no_overlap(records: list[PassRecord], killed_at: float | None = None, pids: tuple[int, ...] = ()) -> None:
    """Assert that no two passes ran at once (a pass of a killed process ended when it was
    killed), and, with the fault suite's history checker, that no two overlapped and that
    fences only grew in start order, none used by two processes."""
    ends = dict.fromkeys(pids, killed_at) if killed_at is not None else {}
    found = overlaps(records, unfinished_end=ends)  # type: ignore[arg-type]
    assert not found, f"overlapping passes: {found[:3]}"
    from tests.chaos.checker import Report, by_loop, check_fences, check_overlaps
    from tests.chaos.records import History, RunnerLife
    from tests.chaos.records import PassRecord as Recorded

    history = History(
        ttl=10.0, loops=["tick"], writes=[], logs=[], faults=[], warm=0.0, teardown=time.monotonic(),
        passes=[Recorded("tick", r.pid, n, r.fence, r.start, r.end) for n, r in enumerate(records)],
        runners=[RunnerLife(n, pid, 0.0, exited=killed_at) for n, pid in enumerate(pids)],
    )
    report, grouped = Report(), by_loop(history.passes)
    check_fences(grouped, [], report)
    check_overlaps(history, grouped, report)
    assert (report.fence_violations, report.overlaps) == (0, 0), report.problems


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (its pool processes, its work horse), from /proc."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    out.append(int(child))
                    todo.append(int(child))
    return out


def keeper_pid(env: dict[str, str], system: str) -> int | None:
    """The pid of the worker whose keeper holds the keeper's lease (``APP.keeper:SYSTEM``)."""
    import asyncio

    import ostinato
    from ostinato.forge import keeper_key

    async def look() -> int | None:
        store = ostinato.from_url(env["JOBS_COORDINATOR"])
        try:
            await store.open()
            for record in await store.loops():
                if record.key == keeper_key(env["JOBS_APP"], system) and record.holder:
                    return int(record.holder.rpartition(":")[2])
            return None
        finally:
            await store.close()

    return asyncio.run(look())


def sigterm_mid_pass(running: Workers, env: dict[str, str], first: subprocess.Popen[bytes]) -> str:
    """SIGTERM worker ``first`` in the middle of one of its passes; wait until it exited 0 and
    three passes started after; return the workers' logs."""
    assert wait_until(lambda: len(passes(env)) >= 3, 20), running.logs()
    assert wait_until(lambda: passes(env)[-1].end is None
                      and passes(env)[-1].pid in (first.pid, *descendants(first.pid)), 20,
                      step=0.01), running.logs()
    stopped = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert wait_until(lambda: first.poll() is not None, 15), running.logs()
    assert first.returncode == 0, running.logs()
    assert wait_until(lambda: len([r for r in passes(env) if r.start > stopped + 0.5]) >= 3, 10)
    return running.logs()


def chain_unbroken(env: dict[str, str], logs: str) -> None:
    """The passes never overlapped, each but the last finished, none waited 1.5 s for the
    next, and no chain had to be re-forged."""
    records = passes(env)
    no_overlap(records)
    assert all(r.end is not None for r in records[:-1])
    assert max(gaps(records)) < 1.5, sorted(gaps(records))[-3:]
    assert "re-forged" not in logs
