"""``ostinato status --check``, ``ostinato release`` and the JSON event log, against real runners."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ostinato.coordinators import from_url
from ostinato.observe import unhealthy
from tests.observe.conftest import Stack, free_port, wait_for
from tests.observe.test_metrics import scrape, value

pytestmark = pytest.mark.slow

LOOPS = ("obs:tick", "obs:flaky", "obs:blocker")


async def _create(url: str) -> None:
    """Make the (empty) coordinator, as a runner starting would."""
    coordinator = from_url(url)
    await coordinator.open()
    assert await coordinator.loops() == []
    await coordinator.close()


def test_status_check_fails_on_no_loops_and_no_runner_but_not_on_running_or_paused(
    stack: Stack,
) -> None:
    """--check: exit 1 for an empty coordinator and for a loop with no runner, 0 when running or paused.
    No coordinator at all is exit 2, and the read-only command does not make one."""
    missing = stack.cli("status", "--check")
    assert missing.returncode == 2
    assert missing.stderr.startswith("ostinato: error: no coordinator found: sqlite:///")
    assert not Path(stack.url.removeprefix("sqlite:///")).exists()
    asyncio.run(_create(stack.url))
    empty = stack.cli("status", "--check")
    assert empty.returncode == 1
    assert empty.stderr.strip() == "ostinato: check failed: no loops are known: no runner has started"

    runner = stack.runner()
    wait_for(lambda: stack.reported(*LOOPS), what="reports of every loop")
    running = stack.cli("status", "--check", "--json")
    assert running.returncode == 0, running.stderr
    assert '"state": "running"' in running.stdout

    assert stack.cli("pause", "flaky").returncode == 0
    wait_for(lambda: stack.status()["obs:flaky"]["state"] == "paused", what="the pause")
    assert stack.cli("status", "--check").returncode == 0  # a pause is an operator's choice

    assert runner.stop() == 0  # a graceful stop releases every lease: nobody runs the loops now
    stopped = stack.cli("status", "--check")
    assert stopped.returncode == 1
    assert stopped.stderr.strip() == (  # flaky is still paused, and that is fine
        "ostinato: check failed: obs:blocker has no runner; obs:tick has no runner"
    )


def test_release_hands_the_loop_over_with_a_greater_fence(stack: Stack) -> None:
    """release revokes the lease: the holder stops at once, another runner takes it with a greater fence."""
    ports = [free_port(), free_port()]
    runners = [stack.runner("--metrics-port", str(p), "--metrics-host", "127.0.0.1") for p in ports]
    wait_for(lambda: stack.reported("obs:tick"), what="tick's first report")

    def holder_port() -> int | None:
        for port in ports:
            try:
                if value(scrape(port), "ostinato_lease_held", "tick") == 1:
                    return port
            except OSError:
                return None
        return None

    old = wait_for(holder_port, what="a holder of tick")
    before = stack.status()["obs:tick"]
    result = stack.cli("release", "tick")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"released obs:tick (fence {before['fence']}); the next holder gets a greater fence"
    )
    # The old holder learns from its next renewal, and counts the lost lease.
    wait_for(lambda: value(scrape(old), "ostinato_lease_losses_total", "tick") == 1,
             timeout=5, what="the old holder to lose its lease")
    after = wait_for(lambda: (row := stack.status()["obs:tick"])["fence"] > before["fence"]
                     and row["holder"] is not None and row, timeout=5, what="a new grant")
    assert after["fence"] > before["fence"]
    holder = wait_for(holder_port, timeout=5, what="a new holder of tick")
    fences = [value(scrape(port), "ostinato_fence", "tick") for port in ports]
    assert fences.count(None) == 1  # exactly one runner holds it
    assert max(f for f in fences if f is not None) > before["fence"]
    # (Either runner may hold it now: the old holder steps aside for half a second, which
    # gives the other the first go, but on a loaded machine the other may not take it in time.)
    assert holder in ports
    for runner in runners:
        assert runner.stop() == 0

    unknown = stack.cli("release", "nosuch")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("ostinato: error: no loop named 'nosuch'")


def test_json_logs_carry_loop_fence_and_runner_on_every_notable_event(stack: Stack) -> None:
    """--log-format json: one object per line for start, lease won, pass failed, release and stop."""
    runner = stack.runner("--log-format", "json")
    wait_for(lambda: stack.reported(*LOOPS), what="reports of every loop")
    wait_for(lambda: any(line.get("event") == "pass_failed" for line in runner.json_lines()),
             what="a failed pass of flaky")
    assert runner.stop() == 0
    lines = runner.json_lines()
    assert all(line.strip().startswith("{") for line in runner.output().splitlines() if line.strip())
    label = next(line["runner"] for line in lines if line.get("event") == "runner_started")
    assert label.endswith(f":{runner.pid}")
    events = [line["event"] for line in lines if "event" in line]
    assert events[0] == "runner_started"
    assert events[-1] == "runner_stopped"
    for event in ("lease_acquired", "pass_failed", "lease_released"):
        found = [line for line in lines if line.get("event") == event]
        assert found, f"no {event} line"
        for line in found:
            assert line["loop"] in LOOPS
            assert isinstance(line["fence"], int)
            assert line["runner"] == label
    failed = next(line for line in lines if line.get("event") == "pass_failed")
    assert failed["level"] == "error"
    assert failed["loop"] == "obs:flaky"
    assert "RuntimeError: flaky pass 3" in failed["traceback"]
    acquired = {line["loop"] for line in lines if line.get("event") == "lease_acquired"}
    assert acquired == set(LOOPS)


def test_unhealthy_names_each_stalled_or_unrun_loop() -> None:
    """unhealthy() lists stalled and unrun loops and ignores running, idle and paused ones."""
    rows = [{"app": "a", "loop": n, "state": s} for n, s in
            [("r", "running"), ("i", "idle"), ("p", "paused"), ("s", "stalled"), ("n", "no runner")]]
    assert unhealthy(rows) == ["a:s is stalled", "a:n has no runner"]
    assert unhealthy([]) == ["no loops are known: no runner has started"]
