"""The threads sync passes run in: elastic, bounded in a burst, never leaving a job waiting long."""

from __future__ import annotations

import threading
import time

from ostinato.workers import Workers


def wait(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_a_burst_of_short_jobs_runs_every_job_on_few_threads() -> None:
    pool = Workers(soft_cap=8, idle_exit=5.0)
    done = []
    lock = threading.Lock()

    def job(i: int) -> None:
        time.sleep(0.001)
        with lock:
            done.append(i)

    for i in range(2000):
        pool.run(lambda i=i: job(i))
    wait(lambda: len(done) == 2000)
    assert sorted(done) == list(range(2000))
    # The first 8 start at once; a few more while jobs waited, never one per job.
    assert pool.started < 200


def test_jobs_that_never_end_do_not_keep_the_others_waiting() -> None:
    """Past the soft cap, new threads still start while jobs wait: ten endless jobs on a pool
    of two all run, and a short job after them runs too."""
    pool = Workers(soft_cap=2, spawn_every=0.01, spawn_burst=2, idle_exit=5.0)
    release = threading.Event()
    running = []
    for i in range(10):
        pool.run(lambda i=i: (running.append(i), release.wait()))
    short = threading.Event()
    pool.run(short.set)
    wait(lambda: len(running) == 10 and short.is_set(), timeout=5.0)
    release.set()


def test_idle_threads_end() -> None:
    pool = Workers(soft_cap=4, idle_exit=0.1)
    ran = threading.Event()
    for _ in range(4):
        pool.run(ran.set)
    wait(ran.is_set)
    wait(lambda: pool.threads == 0, timeout=5.0)
    pool.run(ran.clear)  # and a new job still runs, on a new thread
    wait(lambda: not ran.is_set())
