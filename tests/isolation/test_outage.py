"""A holder that loses its coordinator mid-pass ends the pass before its lease runs out."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.runner import Runner
from tests.runner.test_runner import Flaky, until

pytestmark = pytest.mark.slow


async def test_isolated_child_and_async_pass_end_before_the_lease_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Renewals fail mid-pass: the isolated child is killed and the async pass cancelled in time."""
    monkeypatch.setenv("OSTINATO_TEST_RECORDS", str(tmp_path))
    from tests.isolation import outage_app

    monkeypatch.setattr(outage_app, "RECORDS", str(tmp_path))
    flaky = Flaky(MemoryCoordinator(uuid.uuid4().hex))
    app = outage_app.app
    runner = Runner(app.name, list(app.loops.values()), flaky, app_target=app.locate())
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    pid_file = tmp_path / "isolated.pid"
    isolated, in_loop = runner.keepers["outage:isolated"], runner.keepers["outage:in_loop"]
    try:
        await until(lambda: pid_file.exists() and in_loop.stats.running_since is not None, 15)
        child = int(pid_file.read_text())
        assert isolated.lease is not None
        assert in_loop.lease is not None
        deadlines = [isolated.lease.deadline, in_loop.lease.deadline]
        flaky.down = True
        await runner.renew_once()

        def child_gone() -> bool:
            try:
                stat = Path(f"/proc/{child}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):  # reaped as it was read
                return True
            return stat.rsplit(")", 1)[1].split()[0] == "Z"

        await until(lambda: child_gone() and in_loop.stats.running_since is None, 5)
        ended = time.monotonic()
        assert ended < min(deadlines), "a pass outlived the lease it started under"
        assert in_loop.stats.last_error == "CancelledError: the lease was lost while the pass ran"
        # The runner's thread records the failed pass once it has reaped the killed child.
        await until(lambda: isolated.stats.last_error is not None, 5)
        assert "lease was lost" in (isolated.stats.last_error or "")
    finally:
        flaky.down = False
        stop.set()
        await task
    assert child_gone()


def test_isolated_child_dies_with_its_runner(tmp_path: Path) -> None:
    """kill -9 of the runner takes its isolated child with it, mid-pass: the lease died with
    the runner, so the pass must not run on while a standby takes the loop over."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    env = {**os.environ, "OSTINATO_TEST_RECORDS": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    runner = subprocess.Popen(
        [sys.executable, "-m", "ostinato", "run", "tests.isolation.outage_app:app",
         "--coordinator", f"sqlite:///{tmp_path / 'c.db'}"],
        env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pid_file = tmp_path / "isolated.pid"
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert runner.poll() is None, "the runner exited"
            assert time.monotonic() < deadline, "the isolated pass never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        deadline = time.monotonic() + 5  # the pass sleeps for 60 s
        while Path(f"/proc/{child}").exists() and "zombie" not in _state(child):
            assert time.monotonic() < deadline, "the child outlived its runner"
            time.sleep(0.02)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line
    except FileNotFoundError:
        pass
    return "zombie"
