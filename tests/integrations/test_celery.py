"""Loops on real ``celery worker`` processes (Redis broker): the chain neither breaks nor doubles."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integrations.jobs_harness import (
    ROOT,
    VENV_BIN,
    Workers,
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
    rabbitmq_answers,
    redis_answers,
    scraped,
    sigterm_mid_pass,
    wait_until,
    workers,
)

pytest.importorskip("celery")

pytestmark = pytest.mark.slow

APP = "tests.integrations.celery_jobs:celery"


def celery_worker(env: dict[str, str], name: str, pool: str = "prefork") -> list[str]:
    """A worker on the test's own queue (its Celery app's default queue), named after the test."""
    return [str(VENV_BIN / "celery"), "-A", APP, "worker", "-n", f"{name}-{env['JOBS_APP']}@%h",
            "-P", pool, "-c", "1", "-l", "info", "--without-mingle", "--without-gossip",
            "--without-heartbeat"]


def nodes(env: dict[str, str]) -> list[str]:
    return [f"{name}-{env['JOBS_APP']}@{socket.gethostname()}" for name in ("a", "b")]


@pytest.fixture(autouse=True)
def _redis() -> None:
    redis_answers()


def on_broker(tmp_path: Path, broker: str, **settings: str) -> dict[str, str]:
    """The environment of a test's workers with Celery's broker on Redis or on RabbitMQ."""
    if broker == "rabbitmq":
        settings["JOBS_BROKER"] = rabbitmq_answers()
    return environment(tmp_path, **settings)


BROKERS = ["redis", pytest.param("rabbitmq", marks=pytest.mark.extended)]


def celery_cli(env: dict[str, str], *args: str) -> str:
    """Run ``celery -A APP ARGS`` as an operator would; return what it printed."""
    done = subprocess.run([str(VENV_BIN / "celery"), "-A", APP, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def waiting(celery: Any, queue: str) -> int:
    """How many messages wait in ``queue`` (on any broker)."""
    from amqp.exceptions import ChannelError

    with celery.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except ChannelError:  # Redis keeps no empty queue
            return 0


def purged_by_the_cli(running: Workers, env: dict[str, str], celery: Any) -> float:
    """With the workers' consumers cancelled (``celery control cancel_consumer``), wait for the
    next link to sit in the queue, remove it with ``celery purge -f``, add the consumers back,
    and return the seconds from the purge's end to the next pass."""
    queue, names = env["JOBS_QUEUE"], ",".join(nodes(env))
    assert celery_cli(env, "control", "-d", names, "cancel_consumer", queue).count(
        "no longer consuming") == 2
    assert wait_until(lambda: waiting(celery, queue) >= 1, 10), running.logs()
    out = celery_cli(env, "purge", "-f")
    purged_at = time.monotonic()
    assert "Purged 1 message" in out, out
    assert celery_cli(env, "control", "-d", names, "add_consumer", queue).count(
        "add consumer") == 2
    assert wait_until(lambda: passes(env)[-1].start > purged_at, 15), running.logs()
    return next(r.start for r in passes(env) if r.start > purged_at) - purged_at


@pytest.mark.parametrize("coordinator", ["redis", "postgresql"])  # SQLite: in test_rq
def test_a_chain_on_two_workers_runs_paced_passes_that_never_overlap(
    tmp_path: Path, coordinator: str
) -> None:
    """Two prefork workers, nothing seeded: passes start by themselves, never overlap, keep
    the pause between them (one chain, not two), status shows the loop running and its
    passes counted, and ``celery inspect active`` the link at work; on each coordinator."""
    from tests.integrations.celery_jobs import made

    env = environment(tmp_path, JOBS_PAUSE="100ms", JOBS_TAKES="0.02")
    env["JOBS_COORDINATOR"] = coordinator_url(coordinator, tmp_path, env["JOBS_APP"])
    shown: list[str] = []

    def active() -> bool:  # the link runs its passes, its pauses waited out in the job
        shown[:] = [celery_cli(env, "inspect", "active", "-d", ",".join(nodes(env)))]
        return f"'name': 'ostinato.{env['JOBS_APP']}.link:tick'" in shown[0]

    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"))
        running.start(*celery_worker(env, "b"))
        assert wait_until(lambda: len(passes(env)) >= 25, 20), running.logs()
        app, _, _ = made(env)
        rows = {row["loop"]: row for row in app.status()}
        if coordinator == "redis":  # `celery inspect active` names the loop of the link at work
            assert wait_until(active, 10, step=0.1), shown
    records = passes(env)
    no_overlap(records)
    assert all(gap >= 0.095 for gap in gaps(records)), sorted(gaps(records))[:5]
    assert [r.fence for r in records] == sorted(r.fence for r in records)
    row = rows["tick"]
    assert row["passes"] >= 15, row  # each link reports before it hands the lease on
    if coordinator == "redis":  # held between links too
        assert row["state"] == "running", row


def test_a_chain_whose_every_link_enqueues_two_stays_one_chain(tmp_path: Path) -> None:
    """Every link enqueues its next link twice (the article's doubling chain), and the chain
    is seeded twice more by hand: one copy of each link runs, the others end, so passes keep
    the loop's pause (a doubled chain would halve the gaps) and never overlap."""
    from tests.integrations.celery_jobs import made

    env = environment(tmp_path, JOBS_PAUSE="150ms", JOBS_TAKES="0.02", JOBS_TWICE="1")
    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"))
        running.start(*celery_worker(env, "b"))
        assert wait_until(lambda: len(passes(env)) >= 5, 20), running.logs()
        _, _, jobs = made(env)
        assert jobs.seed("tick") is None  # the live chain holds the loop
        assert jobs.seed("tick") is None
        seeded = time.monotonic()
        assert wait_until(lambda: passes(env)[-1].start > seeded + 2.5, 10), running.logs()
        logs = running.logs()
    records = passes(env)
    no_overlap(records)
    assert min(gaps(records)) >= 0.145, sorted(gaps(records))[:5]
    assert max(gaps(records)) < 0.5, sorted(gaps(records))[-5:]  # and the chain never broke
    assert logs.count("ends without running (stale)") >= len({r.fence for r in records}) - 2
    assert "re-forged" not in logs


@pytest.mark.extended
def test_a_purged_queue_re_forms_the_chain_within_patience(tmp_path: Path) -> None:
    """Workers stop consuming, the pending link is purged (what ``celery purge`` does): the
    keeper re-forges the chain. It asks for the lease held for the lost link once that link
    is ``patience`` late, and Redis grants it once the claim was seen unchanged for its TTL
    (the pause plus ``patience``): passes resume within twice the patience, the pause and a
    second."""
    import redis

    from tests.integrations.celery_jobs import made

    env = environment(tmp_path, JOBS_PAUSE="300ms", JOBS_TAKES="0.02", JOBS_PATIENCE="1s")
    _, celery, _ = made(env)
    broker = redis.Redis.from_url(env["JOBS_BROKER"])
    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"))
        running.start(*celery_worker(env, "b"))
        assert wait_until(lambda: len(passes(env)) >= 3, 20), running.logs()
        queue = env["JOBS_QUEUE"]
        assert len(celery.control.cancel_consumer(queue, destination=nodes(env), reply=True)) == 2
        assert wait_until(lambda: broker.llen(queue) >= 1, 5)
        purged_at = time.monotonic()
        purged = celery.control.purge()
        assert len(celery.control.add_consumer(queue, destination=nodes(env), reply=True)) == 2
        assert wait_until(lambda: passes(env)[-1].start > purged_at, 10), running.logs()
        resumed = next(r.start for r in passes(env) if r.start > purged_at) - purged_at
        logs = running.logs()
    assert purged >= 1
    print(f"resumed {resumed:.2f}s after the purge")
    assert resumed < 2 * 1.0 + 0.3 + 1.0
    assert "chain re-forged" in logs
    no_overlap(passes(env))


@pytest.mark.parametrize("broker", BROKERS)
def test_celery_inspect_shows_the_link_and_celery_purge_is_recovered_within_stall_after(
    tmp_path: Path, broker: str
) -> None:
    """The operators' own commands on a live chain: ``celery inspect scheduled`` shows the
    pending link under a name that says its loop (``ostinato.APP.link:tick``); and the next
    link removed with ``celery purge -f`` (the consumers cancelled first, or the workers would
    hold it), the chain re-forms by itself within the loop's ``stall_after`` plus a second."""
    from tests.integrations.celery_jobs import made

    env = on_broker(tmp_path, broker, JOBS_PAUSE="1500ms", JOBS_TAKES="0.02", JOBS_STALL="3s")
    _, celery, _ = made(env)
    ports = [free_port(), free_port()]
    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"), JOBS_METRICS_PORT=str(ports[0]))
        running.start(*celery_worker(env, "b"), JOBS_METRICS_PORT=str(ports[1]))
        assert wait_until(lambda: len(passes(env)) >= 2, 20), running.logs()
        shown = celery_cli(env, "inspect", "scheduled", "-d", ",".join(nodes(env)))
        resumed = purged_by_the_cli(running, env, celery)
        assert wait_until(lambda: len(passes(env)) >= 5, 10), running.logs()
        logs = running.logs()
        reforged = scraped(ports, "ostinato_chains_forged_total", app=env["JOBS_APP"], kind="reforged")
    assert f"ostinato.{env['JOBS_APP']}.link:tick" in shown, shown
    print(f"resumed {resumed:.2f}s after celery purge")
    assert resumed < 3.0 + 1.0
    assert "chain re-forged" in logs
    assert reforged == logs.count("chain re-forged") >= 1  # in the metrics of the keeper's worker
    no_overlap(passes(env))


@pytest.mark.extended
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_kill9_of_the_keepers_worker_mid_pass_resumes_on_the_other_within_the_lease(
    tmp_path: Path, broker: str
) -> None:
    """kill -9 of the whole worker (its process group: its pool process included) that hosts
    the elected keeper, in the middle of a pass: the other worker's keeper takes over and the
    loop goes on within the lease TTL plus a second, and no passes overlap; on either broker."""
    env = on_broker(tmp_path, broker, JOBS_PAUSE="50ms", JOBS_TAKES="0.3", JOBS_LEASE="2s",
                    JOBS_PATIENCE="1s")
    with workers(tmp_path, env) as running:
        started = [running.start(*celery_worker(env, "a")), running.start(*celery_worker(env, "b"))]
        assert wait_until(lambda: len(passes(env)) >= 4, 20), running.logs()
        keeper = keeper_pid(env, "celery")
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
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(5)
        assert wait_until(lambda: passes(env)[-1].start > killed, 10), running.logs()
        resumed = next(r.start for r in passes(env) if r.start > killed) - killed
        assert wait_until(lambda: len([r for r in passes(env) if r.start > killed]) >= 3, 10)
        assert wait_until(lambda: keeper_pid(env, "celery") == other.pid, 5), running.logs()
    print(f"resumed {resumed:.2f}s after kill -9")
    assert resumed < 2.0 + 1.0
    no_overlap(passes(env), killed_at=killed, pids=tuple(victims))


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_warm_shutdown_finishes_the_pass_and_leaves_the_chain_intact(tmp_path: Path, pool: str) -> None:
    """SIGTERM to a worker in the middle of a pass: the pass finishes, the worker exits 0,
    and the other worker carries the same chain on with no break (no re-forge needed)."""
    env = environment(tmp_path, JOBS_PAUSE="100ms", JOBS_TAKES="0.3", JOBS_PATIENCE="5s")
    with workers(tmp_path, env) as running:
        first = running.start(*celery_worker(env, "a", pool=pool))
        running.start(*celery_worker(env, "b", pool=pool))
        logs = sigterm_mid_pass(running, env, first)
    chain_unbroken(env, logs)


@pytest.mark.extended
def test_clock_mode_skips_a_pass_whose_previous_still_runs_and_survives_its_keeper(
    tmp_path: Path,
) -> None:
    """mode="clock", every=400ms, passes of 0.5 s: the elected keeper enqueues a pass per slot,
    a slot whose previous pass still runs is skipped (never queued behind it: passes wait for
    the next slot, 0.3 s after the previous end, rather than start at it), and kill -9 of the
    keeper's worker hands the clock over."""
    env = environment(tmp_path, JOBS_MODE="clock", JOBS_EVERY="400ms", JOBS_TAKES="0.5",
                      JOBS_PATIENCE="1s")
    with workers(tmp_path, env) as running:
        started = [running.start(*celery_worker(env, "a")), running.start(*celery_worker(env, "b"))]
        assert wait_until(lambda: len(passes(env)) >= 5, 20), running.logs()
        keeper = keeper_pid(env, "celery")
        [first] = [proc for proc in started if proc.pid == keeper]
        [other] = [proc for proc in started if proc is not first]
        victims = [first.pid, *descendants(first.pid)]
        killed = time.monotonic()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(5)
        assert wait_until(lambda: len([r for r in passes(env) if r.start > killed + 0.5]) >= 3, 15), \
            running.logs()
        assert keeper_pid(env, "celery") == other.pid
        logs = running.logs()
    records = passes(env)
    no_overlap(records, killed_at=killed, pids=tuple(victims))
    before = [r for r in records if r.start < killed]
    assert statistics.median(gaps(before)) > 0.15, sorted(gaps(before))  # the next slot, not the end
    assert "is skipped: its previous pass still runs" in logs
    resumed = next(r.start for r in records if r.start > killed) - killed
    print(f"clock resumed {resumed:.2f}s after kill -9 of its keeper")
    assert resumed < 2.0 + 1.0


@pytest.mark.parametrize("mode", ["chain", pytest.param("clock", marks=pytest.mark.extended)])
def test_a_cron_loop_runs_one_pass_per_calendar_slot(tmp_path: Path, mode: str) -> None:
    """``cron="* * * * * */2"`` (every two seconds: seconds last): in chain mode each link is
    delayed to the next slot, in clock mode the keeper enqueues a pass per slot; either way
    each pass stands for its own slot (``ctx.scheduled_for``), the slot after the previous
    pass's, and starts at it, and no two passes overlap."""
    env = environment(tmp_path, JOBS_MODE=mode, JOBS_CRON="* * * * * */2", JOBS_TAKES="0.02")
    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"))
        running.start(*celery_worker(env, "b"))
        assert wait_until(lambda: len(cron_passes(env)) >= 4, 25), running.logs()
    no_overlap(passes(env))
    on_cron_slots(env, 2.0)


def test_ostinato_wake_runs_the_next_pass_of_an_idle_chain_at_once(tmp_path: Path) -> None:
    """Passes that find no work (``IDLE``, backoff 4 s) leave the next link waiting 4 s in the
    queue; ``ostinato wake tick`` makes the keeper drop that link and forge one due now, so the
    next pass starts within a second of the command, not 4 s after the last; the dropped link
    ends stale when it comes, and no passes overlap."""
    env = environment(tmp_path, JOBS_IDLE="4s", JOBS_TAKES="0.02")
    ports = [free_port(), free_port()]
    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"), JOBS_METRICS_PORT=str(ports[0]))
        running.start(*celery_worker(env, "b"), JOBS_METRICS_PORT=str(ports[1]))
        assert wait_until(lambda: len(passes(env)) >= 1 and passes(env)[-1].end is not None, 20), \
            running.logs()
        time.sleep(0.5)  # the lease handed on to the next link, due 4 s after the pass
        done = subprocess.run([str(VENV_BIN / "ostinato"), "wake", "tick", "-A",
                               "tests.integrations.celery_jobs:app"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        woke = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr
        assert wait_until(lambda: len(passes(env)) >= 2, 5), running.logs()
        first, second = passes(env)[:2]
        assert first.end is not None
        assert wait_until(lambda: "ends without running (stale)" in running.logs(),
                          first.end + 6 - time.monotonic()), running.logs()
        logs = running.logs()
        app = {"app": env["JOBS_APP"]}
        counted = {kind: scraped(ports, "ostinato_chains_forged_total", kind=kind, **app)
                   for kind in ("forged", "reforged", "woken")}
        stale = scraped(ports, "ostinato_job_links_total", outcome="stale", **app)
        ran = scraped(ports, "ostinato_job_links_total", outcome="ran", **app)
    print(f"woken pass {second.start - woke:.2f}s after ostinato wake returned, "
          f"{second.start - first.end:.2f}s after the last pass")
    assert second.start - woke < 1.0
    assert second.start - first.end < 3.5
    assert "chain re-forged" not in logs
    # What the workers' metrics say: the chain forged at start and once woken, the link it
    # replaced counted stale (in whichever pool process ran it), the others ran.
    assert counted == {"forged": 1, "reforged": 0, "woken": 1}, counted
    assert stale == logs.count("ends without running (stale)") >= 1
    assert ran >= 2
    no_overlap(passes(env))


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_a_worker_on_a_green_pool_is_refused_with_the_pools_to_use(tmp_path: Path, pool: str) -> None:
    """The keeper's bootstep refuses an eventlet or gevent pool, naming the pools that work."""
    from ostinato.celery import _keeper_step
    from ostinato.errors import ConfigurationError
    from tests.integrations.celery_jobs import made

    _, _, jobs = made(environment(tmp_path))
    step = _keeper_step(jobs)

    class Parent:
        pool_cls = type("TaskPool", (), {"__module__": f"celery.concurrency.{pool}"})

    with pytest.raises(ConfigurationError, match="--pool prefork, --pool solo, --pool threads"):
        step.start(step.__new__(step), Parent())


@pytest.mark.extended
def test_a_chain_on_rabbitmq_runs_paced_passes_that_never_overlap(tmp_path: Path) -> None:
    """The same chain with RabbitMQ as Celery's broker: passes keep the pause, never overlap."""
    env = on_broker(tmp_path, "rabbitmq", JOBS_PAUSE="100ms", JOBS_TAKES="0.02")
    with workers(tmp_path, env) as running:
        running.start(*celery_worker(env, "a"))
        running.start(*celery_worker(env, "b"))
        assert wait_until(lambda: len(passes(env)) >= 25, 20), running.logs()
    records = passes(env)
    no_overlap(records)
    assert min(gaps(records)) >= 0.095, sorted(gaps(records))[:5]


@pytest.mark.extended
def test_a_runner_and_job_workers_host_one_loop_without_overlap(tmp_path: Path) -> None:
    """An ``ostinato run`` runner beside a Celery worker on the same loop: never two passes at
    once; when the worker is killed, the runner takes the loop on within the lease."""
    env = environment(tmp_path, JOBS_PAUSE="50ms", JOBS_TAKES="0.05", JOBS_LEASE="2s")
    with workers(tmp_path, env) as running:
        worker = running.start(*celery_worker(env, "a"))
        assert wait_until(lambda: len(passes(env)) >= 3, 20), running.logs()
        runner = running.start(str(VENV_BIN / "ostinato"), "run", "tests.integrations.celery_jobs:app")
        time.sleep(3)
        killed = time.monotonic()
        victims = [worker.pid, *descendants(worker.pid)]
        os.killpg(worker.pid, signal.SIGKILL)
        assert wait_until(lambda: any(r.start > killed and r.pid == runner.pid for r in passes(env)), 10), \
            running.logs()
        resumed = next(r.start for r in passes(env) if r.start > killed) - killed
    print(f"the runner took over {resumed:.2f}s after kill -9 of the worker")
    no_overlap(passes(env), killed_at=killed, pids=tuple(victims))
    assert resumed < 2.0 + 1.0
