"""The ``ostinato`` command against live runners, and its answers to bad input."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import ostinato
from tests.process.conftest import OSTINATO, WORKLOAD, Cluster

pytestmark = pytest.mark.slow


def status(cluster: Cluster) -> dict[str, dict[str, object]]:
    result = cluster.cli("status", "--json")
    if result.returncode == 2 and "no coordinator found" in result.stderr:
        return {}  # no runner has made it yet
    assert result.returncode == 0, result.stderr
    return {row["loop"]: row for row in json.loads(result.stdout)["loops"]}


def test_status_pause_resume_and_wake_from_another_process(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """status shows the live loop; pause stops it, resume restarts it, wake ends an idle wait."""
    cluster = cluster_factory(lease="10s")
    runner = cluster.start()
    cluster.wait(lambda: len(cluster.passes()) > 10, what="passes")
    cluster.wait(lambda: status(cluster).get("work", {}).get("passes", 0) > 0, what="a report")
    rows = status(cluster)
    assert rows["work"]["state"] == "running"
    assert rows["work"]["holder"].endswith(f":{runner.pid}")  # type: ignore[union-attr]
    assert rows["work"]["fence"] >= 1  # type: ignore[operator]
    assert rows["drain"]["state"] == "idle"
    assert cluster.cli("status").stdout.splitlines()[0].split()[:3] == ["LOOP", "STATE", "HOLDER"]

    paused = cluster.cli("pause", "work")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "paused work:work"
    cluster.wait(lambda: status(cluster)["work"]["state"] == "paused", what="paused state")
    time.sleep(0.2)  # a pass that was running when the pause arrived may still finish
    count = len(cluster.passes())
    time.sleep(0.5)
    assert len(cluster.passes()) == count

    assert cluster.cli("resume", "work:work").returncode == 0
    cluster.wait(lambda: len(cluster.passes()) > count + 5, what="passes after resume")

    drains = len(cluster.passes("drain"))
    assert drains >= 1
    assert cluster.cli("wake", "drain").returncode == 0
    cluster.wait(lambda: len(cluster.passes("drain")) > drains, timeout=5, what="woken drain")
    os.kill(runner.pid, signal.SIGTERM)
    assert runner.wait(15) == 0


def test_status_of_a_loop_whose_runner_died(cluster_factory: Callable[..., Cluster]) -> None:
    """After its only runner is killed, a loop shows as having no runner."""
    cluster = cluster_factory(lease="10s")
    runner = cluster.start()
    cluster.wait(lambda: status(cluster).get("work", {}).get("passes", 0) > 0, what="a report")
    cluster.kill(runner.pid)
    runner.wait(10)
    assert status(cluster)["work"]["state"] == "no runner"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    env.pop("OSTINATO_COORDINATOR", None)
    return subprocess.run([*OSTINATO, *args], capture_output=True, text=True, timeout=30,
                          env=env, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["run", "no_such_module:app"], "no module 'no_such_module'"),
        (["run", "missing/file.py:app"], "no file 'missing/file.py'"),
        (["run", "justaname"], "write module:attribute"),
        (["run", f"{WORKLOAD}:nothing"], "has no attribute 'nothing'"),
        (["run", f"{WORKLOAD}:RECORDS"], "is a str ("),
        (["run", f"{WORKLOAD}:LOOPS"], "is an int ("),
        (["run", f"{WORKLOAD}:app", "--coordinator", "mysql://x"], "unknown coordinator scheme"),
        (["run", f"{WORKLOAD}:app", "--coordinator", "nonsense"], "bad coordinator URL"),
        (["run", f"{WORKLOAD}:app", "--coordinator", "sqlite:///no/such/dir/x.db"],
         "folder 'no/such/dir' does not exist"),
        (["run", f"{WORKLOAD}:app", "--only", "ghost"], "no loop named 'ghost'"),
        (["status", "--coordinator", "sqlite://relative.db"], "bad SQLite URL"),
        (["pause", "ghost", "--coordinator", "memory://"], "no loop named 'ghost'"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_2(args: list[str], words: str, tmp_path: Path) -> None:
    """Each mistake is named on one line of stderr, with no traceback, and a non-zero exit."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("ostinato: error:"), result.stderr
    assert words in lines[-1]
    assert "Traceback" not in result.stderr


def test_bad_declaration_in_the_app_file(tmp_path: Path) -> None:
    """A loop declared with a bad duration fails the command with the loop and field named."""
    app_file = tmp_path / "bad.py"
    app_file.write_text(
        "import ostinato\napp = ostinato.App('bad')\n"
        "@app.loop(every='5 parsecs')\ndef lost(ctx): pass\n"
    )
    result = run_cli("run", f"{app_file}:app", cwd=tmp_path)
    assert result.returncode == 2
    assert "loop 'lost', every=:" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_cli("run", f"{app_file}:app", "--debug", cwd=tmp_path)
    assert "Traceback" in debug.stderr


def test_unwritable_sqlite_folder(tmp_path: Path) -> None:
    """A folder the runner cannot write is refused up front."""
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; the check cannot be seen as root")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli("status", "--coordinator", f"sqlite:///{locked}/x.db")
    assert result.returncode == 2
    assert "not writable" in result.stderr


def test_missing_extra_names_the_install(tmp_path: Path) -> None:
    """Asking for Redis without redis-py says which pip install to run."""
    blocker = tmp_path / "redis.py"
    blocker.write_text("raise ImportError('blocked for the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path),
                                                        str(Path(__file__).parents[2] / "src")])}
    result = subprocess.run([*OSTINATO, "status", "--coordinator", "redis://127.0.0.1:6379/0"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2
    assert "pip install 'ostinato[redis]'" in result.stderr


def test_control_commands_never_make_a_coordinator_and_find_the_app_s(tmp_path: Path) -> None:
    """With nothing configured, status looks for ./ostinato.db and says where it looked when it
    is not there, creating nothing; ``-A APP`` uses the app's coordinator."""
    for command in (["status"], ["pause", "x"], ["forget", "x"]):
        result = run_cli(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"ostinato: error: no coordinator found: sqlite:///ostinato.db names "
            f"{tmp_path / 'ostinato.db'}, which does not exist; run this where the runners run, "
            "or say which with --coordinator URL or -A APP"
        )
    assert list(tmp_path.iterdir()) == []

    db = tmp_path / "elsewhere.db"
    (tmp_path / "shop.py").write_text(
        f"import ostinato\napp = ostinato.App('shop', coordinator='sqlite:///{db}')\n"
        "@app.loop\ndef tick(ctx): pass\n"
    )
    assert "does not exist" in run_cli("status", "-A", "shop.py:app", cwd=tmp_path).stderr
    started = subprocess.Popen([*OSTINATO, "run", "shop.py:app"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while "shop:tick" not in (found := run_cli("status", "-A", "shop.py:app", cwd=tmp_path)).stdout:
            assert time.monotonic() < deadline, found.stderr
            time.sleep(0.05)
        assert found.returncode == 0
        assert "sqlite:///ostinato.db" not in found.stdout
    finally:
        started.send_signal(signal.SIGTERM)
        assert started.wait(15) == 0
    assert not (tmp_path / "ostinato.db").exists()
    help_text = run_cli("status", "--help").stdout
    assert "the app's, else" not in help_text
    assert "-A, --app APP" in help_text


def test_python_m_and_version() -> None:
    """``python -m ostinato --version`` works."""
    result = subprocess.run([sys.executable, "-m", "ostinato", "--version"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.split()[-1] == importlib.metadata.version("ostinato") == ostinato.__version__


def test_a_retired_loop_is_not_counted_once_gone_and_can_be_forgotten(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """A loop no live runner declares fails --check until it has been gone --retired-after,
    then is named and not counted; forget drops it, and is refused for a held loop."""
    cluster = cluster_factory(lease="2s")
    first = cluster.start()
    cluster.wait(lambda: {"work", "drain"} <= set(status(cluster)), what="both loops reported")
    refused = cluster.cli("forget", "drain")
    assert refused.returncode == 2
    assert "cannot forget a loop a runner holds: work:drain (held by" in refused.stderr
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(15) == 0

    second = cluster.start("--only", "work")
    cluster.wait(lambda: status(cluster)["work"]["holder"] == f"{socket.gethostname()}:{second.pid}",
                 what="the second runner holding work")
    check = cluster.cli("status", "--check")
    assert check.returncode == 1
    assert "work:drain has no runner" in check.stderr
    lenient = cluster.cli("status", "--check", "--retired-after", "10ms")
    assert lenient.returncode == 0, lenient.stderr
    assert "not counting work:drain: no live runner declares it" in lenient.stderr

    forgot = cluster.cli("forget", "work:drain")
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout.strip() == "forgot work:drain"
    assert set(status(cluster)) == {"work"}
    assert cluster.cli("status", "--check").returncode == 0
    held = cluster.cli("forget", "work:*")
    assert held.returncode == 2
    assert "work:work (held by" in held.stderr
