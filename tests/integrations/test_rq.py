"""Loops on real ``rq worker -w ostinato.rq.Worker`` processes: the chain neither breaks nor doubles.

Each test's queue lives in a redis-server of its own (``rq suspend`` holds every worker of a
Redis database, so a shared one would reach other runs' workers); the coordinator is the
local Redis, under the test's own prefix.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integrations.jobs_harness import (
    VENV_BIN,
    chain_unbroken,
    coordinator_url,
    cron_passes,
    descendants,
    environment,
    free_port,
    gaps,
    keeper_pid,
    no_overlap,
    on_cron_slots,
    passes,
    redis_answers,
    scraped,
    sigterm_mid_pass,
    wait_until,
    workers,
)
from tests.servers import ThrowawayRedis

pytest.importorskip("rq")

pytestmark = pytest.mark.slow

APP = "tests.integrations.rq_jobs:app"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    redis_answers()
    server = ThrowawayRedis(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def rq_worker(env: dict[str, str], worker: str = "Worker") -> list[str]:
    return [str(VENV_BIN / "rq"), "worker", "-w", f"ostinato.rq.{worker}", "--url", env["JOBS_BROKER"],
            env["JOBS_QUEUE"]]


def rq_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(VENV_BIN / "rq"), *args, "--url", env["JOBS_BROKER"]], env=env,
                          check=True, capture_output=True, text=True, timeout=30)
    return done.stdout


def rq_env(tmp_path: Path, broker: str, **settings: str) -> dict[str, str]:
    return environment(tmp_path, JOBS_BROKER=broker, OSTINATO_APP=APP, **settings)


@pytest.mark.parametrize("coordinator", ["redis", "sqlite"])  # PostgreSQL: in test_celery
def test_a_chain_on_two_workers_runs_paced_passes_that_never_overlap(
    tmp_path: Path, broker: str, coordinator: str
) -> None:
    """Two forking workers, nothing seeded: passes start by themselves, never overlap, keep
    the pause between them (one chain), and status shows the loop with its passes counted;
    on each coordinator."""
    import ostinato

    env = rq_env(tmp_path, broker, JOBS_PAUSE="400ms", JOBS_TAKES="0.02")
    env["JOBS_COORDINATOR"] = coordinator_url(coordinator, tmp_path, env["JOBS_APP"])
    with workers(tmp_path, env) as running:
        running.start(*rq_worker(env))
        running.start(*rq_worker(env))
        assert wait_until(lambda: len(passes(env)) >= 12, 20), running.logs()
        rows = ostinato.App(env["JOBS_APP"], coordinator=env["JOBS_COORDINATOR"]).status()
    records = passes(env)
    no_overlap(records)
    assert all(gap >= 0.395 for gap in gaps(records)), sorted(gaps(records))[:5]
    assert max(gaps(records)) < 1.0, sorted(gaps(records))[-3:]  # the delayed links came on time
    [row] = rows
    assert row["passes"] >= 8, row
    if coordinator == "redis":  # held between links too (SQLite sees a closed link's holder gone)
        assert row["state"] == "running", row


def test_a_chain_whose_every_link_enqueues_two_stays_one_chain(tmp_path: Path, broker: str) -> None:
    """Every link enqueues its next link twice (the article's doubling chain), and the chain
    is seeded twice more by hand: one copy of each link runs, the others end, so passes keep
    the loop's pause (a doubled chain would halve the gaps) and never overlap."""
    from tests.integrations.rq_jobs import made

    env = rq_env(tmp_path, broker, JOBS_PAUSE="150ms", JOBS_TAKES="0.02", JOBS_TWICE="1")
    ports = [free_port(), free_port()]
    with workers(tmp_path, env) as running:
        running.start(*rq_worker(env), JOBS_METRICS_PORT=str(ports[0]))
        running.start(*rq_worker(env), JOBS_METRICS_PORT=str(ports[1]))
        assert wait_until(lambda: len(passes(env)) >= 5, 20), running.logs()
        _, _, jobs = made(env)
        assert jobs.seed("tick") is None  # the live chain holds the loop
        assert jobs.seed("tick") is None
        seeded = time.monotonic()
        assert wait_until(lambda: passes(env)[-1].start > seeded + 2.5, 10), running.logs()
        time.sleep(0.3)  # the last link's copy ends
        logs = running.logs()
        stale = scraped(ports, "ostinato_job_links_total", app=env["JOBS_APP"], outcome="stale")
    records = passes(env)
    no_overlap(records)
    assert min(gaps(records)) >= 0.145, sorted(gaps(records))[:5]
    assert max(gaps(records)) < 0.6, sorted(gaps(records))[-5:]  # and the chain never broke
    assert logs.count("ends without running (stale)") >= len({r.fence for r in records}) - 2
    assert "re-forged" not in logs
    # Each copy was counted by the work horse that ran it, in its worker's metrics.
    assert abs(stale - logs.count("ends without running (stale)")) <= 1, stale


def test_rq_info_shows_the_link_at_work_and_the_worker_log_names_its_loop(
    tmp_path: Path, broker: str
) -> None:
    """``rq info`` shows the chain's queue with its link executing and the worker busy on it,
    and the worker logs each link under a description that names the loop and generation."""
    env = rq_env(tmp_path, broker, JOBS_PAUSE="100ms", JOBS_TAKES="0.02")
    queue = env["JOBS_QUEUE"]
    shown: list[str] = []

    def executing() -> bool:
        shown[:] = [rq_cli(env, "info", "--raw", queue)]
        return f"queue {queue} " in shown[0] and ", 1 executing" in shown[0] and " busy " in shown[0]

    with workers(tmp_path, env) as running:
        running.start(*rq_worker(env))
        assert wait_until(lambda: len(passes(env)) >= 3, 20), running.logs()
        assert wait_until(executing, 10, step=0.2), shown
        logs = running.logs()
    assert f"ostinato link {env['JOBS_APP']}:tick (generation " in logs, logs


@pytest.mark.extended
def test_an_emptied_queue_re_forms_the_chain_within_stall_after(tmp_path: Path, broker: str) -> None:
    """Workers suspended (``rq suspend``), the pending link removed (``rq empty``), workers
    resumed: the keeper re-forges the chain within the loop's ``stall_after`` plus a second,
    plus RQ's one-second poll of its suspension."""
    from redis import Redis

    env = rq_env(tmp_path, broker, JOBS_PAUSE="100ms", JOBS_TAKES="0.02", JOBS_STALL="2s")
    queue = Redis.from_url(broker)
    with workers(tmp_path, env) as running:
        running.start(*rq_worker(env))
        running.start(*rq_worker(env))
        assert wait_until(lambda: len(passes(env)) >= 3, 20), running.logs()
        rq_cli(env, "suspend")
        assert wait_until(lambda: queue.llen(f"rq:queue:{env['JOBS_QUEUE']}") >= 1, 10), running.logs()
        emptied = time.monotonic()
        rq_cli(env, "empty", env["JOBS_QUEUE"])
        rq_cli(env, "resume")
        assert wait_until(lambda: passes(env)[-1].start > emptied, 10), running.logs()
        resumed = next(r.start for r in passes(env) if r.start > emptied) - emptied
        logs = running.logs()
    print(f"resumed {resumed:.2f}s after rq empty")
    assert resumed < 2.0 + 1.0 + 1.0
    assert "chain re-forged" in logs
    no_overlap(passes(env))


@pytest.mark.extended
def test_kill9_of_the_keepers_worker_mid_pass_resumes_on_the_other_within_the_lease(
    tmp_path: Path, broker: str
) -> None:
    """kill -9 of the worker (and its work horse) that hosts the elected keeper, in the middle
    of a pass: the other worker's keeper takes over and the loop goes on within the lease TTL
    plus a second, and no passes overlap."""
    env = rq_env(tmp_path, broker, JOBS_PAUSE="50ms", JOBS_TAKES="0.3", JOBS_LEASE="2s",
                 JOBS_PATIENCE="1s")
    with workers(tmp_path, env) as running:
        started = [running.start(*rq_worker(env)), running.start(*rq_worker(env))]
        assert wait_until(lambda: len(passes(env)) >= 4, 20), running.logs()
        keeper = keeper_pid(env, "rq")
        [first] = [proc for proc in started if proc.pid == keeper]
        [other] = [proc for proc in started if proc is not first]
        victims: list[int] = []

        def mid_pass_in_one_worker() -> bool:
            last = passes(env)[-1]
            group = descendants(first.pid)
            if last.end is None and last.pid in group and time.monotonic() - last.start < 0.2:
                victims[:] = [first.pid, *group]
                return True
            return False

        assert wait_until(mid_pass_in_one_worker, 20, step=0.01), running.logs()
        killed = time.monotonic()
        for pid in victims:  # the work horse has a process group of its own
            os.kill(pid, signal.SIGKILL)
        first.wait(5)
        assert wait_until(lambda: passes(env)[-1].start > killed, 10), running.logs()
        resumed = next(r.start for r in passes(env) if r.start > killed) - killed
        assert wait_until(lambda: len([r for r in passes(env) if r.start > killed]) >= 3, 10)
        assert wait_until(lambda: keeper_pid(env, "rq") == other.pid, 5), running.logs()
    print(f"resumed {resumed:.2f}s after kill -9")
    assert resumed < 2.0 + 1.0
    no_overlap(passes(env), killed_at=killed, pids=tuple(victims))


@pytest.mark.extended
@pytest.mark.parametrize("worker", ["SimpleWorker", "Worker"])
def test_warm_shutdown_finishes_the_pass_and_leaves_the_chain_intact(
    tmp_path: Path, broker: str, worker: str
) -> None:
    """SIGTERM to a worker in the middle of a pass: the pass finishes, the worker exits 0,
    and the other worker carries the same chain on with no break (no re-forge needed)."""
    env = rq_env(tmp_path, broker, JOBS_PAUSE="100ms", JOBS_TAKES="0.3", JOBS_PATIENCE="5s")
    with workers(tmp_path, env) as running:
        first = running.start(*rq_worker(env, worker))
        running.start(*rq_worker(env, worker))
        logs = sigterm_mid_pass(running, env, first)
    chain_unbroken(env, logs)


@pytest.mark.extended
def test_clock_mode_skips_a_pass_whose_previous_still_runs_and_survives_its_keeper(
    tmp_path: Path, broker: str
) -> None:
    """mode="clock", every=400ms, passes of 0.5 s: the elected keeper enqueues a pass per slot,
    a slot whose previous pass still runs is skipped (never queued behind it: passes wait for
    the next slot, 0.3 s after the previous end, rather than start at it), and kill -9 of the
    keeper's worker hands the clock over."""
    env = rq_env(tmp_path, broker, JOBS_MODE="clock", JOBS_EVERY="400ms", JOBS_TAKES="0.5",
                 JOBS_PATIENCE="1s")
    with workers(tmp_path, env) as running:
        started = [running.start(*rq_worker(env)), running.start(*rq_worker(env))]
        assert wait_until(lambda: len(passes(env)) >= 5, 20), running.logs()
        keeper = keeper_pid(env, "rq")
        [first] = [proc for proc in started if proc.pid == keeper]
        [other] = [proc for proc in started if proc is not first]
        victims = [first.pid, *descendants(first.pid)]
        killed = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        first.wait(5)
        assert wait_until(lambda: len([r for r in passes(env) if r.start > killed + 0.5]) >= 3, 15), \
            running.logs()
        assert keeper_pid(env, "rq") == other.pid
        logs = running.logs()
    records = passes(env)
    no_overlap(records, killed_at=killed, pids=tuple(victims))
    before = [r for r in records if r.start < killed]
    assert statistics.median(gaps(before)) > 0.15, sorted(gaps(before))  # the next slot, not the end
    assert "is skipped: its previous pass still runs" in logs
    resumed = next(r.start for r in records if r.start > killed) - killed
    print(f"clock resumed {resumed:.2f}s after kill -9 of its keeper")
    assert resumed < 2.0 + 1.0


@pytest.mark.extended
@pytest.mark.parametrize("mode", ["chain", "clock"])
def test_a_cron_loop_runs_one_pass_per_calendar_slot(tmp_path: Path, broker: str, mode: str) -> None:
    """``cron="* * * * * */2"`` on RQ workers: each pass stands for its own slot, the slot
    after the previous pass's, and starts at it (the links and passes wait in RQ's scheduled
    registry until the keeper moves them), and no two passes overlap."""
    env = rq_env(tmp_path, broker, JOBS_MODE=mode, JOBS_CRON="* * * * * */2", JOBS_TAKES="0.02")
    with workers(tmp_path, env) as running:
        running.start(*rq_worker(env))
        running.start(*rq_worker(env))
        assert wait_until(lambda: len(cron_passes(env)) >= 4, 25), running.logs()
    no_overlap(passes(env))
    on_cron_slots(env, 2.0)


@pytest.mark.extended
def test_ostinato_wake_runs_the_next_pass_of_an_idle_chain_at_once(tmp_path: Path, broker: str) -> None:
    """Passes that find no work (``IDLE``, backoff 4 s) leave the next link 4 s in RQ's
    scheduled registry; ``ostinato wake tick`` makes the keeper drop it and enqueue a link due
    now: the next pass starts within a second, and no passes overlap."""
    env = rq_env(tmp_path, broker, JOBS_IDLE="4s", JOBS_TAKES="0.02")
    with workers(tmp_path, env) as running:
        running.start(*rq_worker(env))
        running.start(*rq_worker(env))
        assert wait_until(lambda: len(passes(env)) >= 1 and passes(env)[-1].end is not None, 20), \
            running.logs()
        time.sleep(0.5)  # the lease handed on to the next link, due 4 s after the pass
        done = subprocess.run([str(VENV_BIN / "ostinato"), "wake", "tick", "-A", APP], env=env,
                              capture_output=True, text=True, timeout=30)
        woke = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr
        assert wait_until(lambda: len(passes(env)) >= 2, 5), running.logs()
        logs = running.logs()
    first, second = passes(env)[:2]
    assert first.end is not None
    print(f"woken pass {second.start - woke:.2f}s after ostinato wake returned")
    assert second.start - woke < 1.0
    assert "woken: the link due at" in logs
    assert "re-forged" not in logs
    no_overlap(passes(env))


def test_a_worker_with_no_app_attached_to_its_queues_refuses_to_start(tmp_path: Path, broker: str) -> None:
    """``rq worker -w ostinato.rq.Worker`` without the app's module says what to set and exits."""
    env = rq_env(tmp_path, broker)
    del env["OSTINATO_APP"]
    done = subprocess.run(rq_worker(env), env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "no ostinato app is attached to the queues" in done.stderr + done.stdout
    assert "OSTINATO_APP=" in done.stderr + done.stdout
