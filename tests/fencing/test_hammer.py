"""Concurrent holders in separate processes: committed fences never decrease in commit order."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import pytest

from tests.fencing.hammer import report
from tests.fencing.stores import Store, violations
from tests.servers import redis_url

PROCESSES = 3
SECONDS = 1.0


def run(backend: str, target: str, data: str, fences: str, check: bool) -> int:
    """Start the hammering processes together; returns how many transactions were refused."""
    spawn = multiprocessing.get_context("spawn")
    counter, barrier, results = spawn.Value("q", 0), spawn.Barrier(PROCESSES), spawn.SimpleQueue()
    workers = [
        spawn.Process(target=report, args=(results, backend, target, data, fences, counter, barrier,
                                           SECONDS, seed, check))
        for seed in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(60)
        assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
        return sum(results.get() for _ in workers)
    finally:
        for worker in workers:
            worker.kill()


def judge(rows: list[tuple[int, int, str]], refused: int, check: bool) -> None:
    assert len(rows) > 50, f"too few transactions committed to tell anything: {len(rows)}"
    if check:
        assert refused > 0, "no holder was ever stale: the test did not exercise the fence"
        assert violations(rows) == []
    else:
        assert violations(rows), "with the comparison off, a stale row should have committed"


CHECK = pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])


@CHECK
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.backend)])
def test_processes_hammering_one_table(tmp_path: Path, backend: str, check: bool) -> None:
    """Three processes with random pauses and ever newer fences write one table through
    ostinato.fenced; in commit order every row's fence is at least every earlier row's."""
    db = Store("sqlite3" if backend == "sqlite" else "psycopg", backend, tmp_path)
    try:
        refused = run(backend, str(db.path) if backend == "sqlite" else db.dsn, db.data, db.fences, check)
        judge(db.rows(), refused, check)
    finally:
        db.drop()


@CHECK
@pytest.mark.backend
def test_processes_hammering_one_redis_stream(check: bool) -> None:
    """The same through ostinato.redis_fenced, each batch an XADD: in stream order every
    entry's fence is at least every earlier entry's."""
    import redis

    url, tag = redis_url(), uuid.uuid4().hex[:10]
    stream, prefix = f"test-fencing:{tag}:log", f"test-fencing:{tag}:fence:"
    client = redis.Redis.from_url(url)
    try:
        refused = run("redis", url, stream, prefix, check)
        rows = [(i, int(fields[b"fence"]), fields[b"writer"].decode())
                for i, (_, fields) in enumerate(client.xrange(stream))]
        judge(rows, refused, check)
    finally:
        client.delete(stream, *client.keys(f"{prefix}*"))
        client.close()
