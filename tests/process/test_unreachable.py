"""A coordinator that is down, silent or wrongly named at start: the process stays in hand."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process.conftest import OSTINATO
from tests.servers import ThrowawayRedis, postgres_url, redis_url

pytestmark = pytest.mark.slow

APP = """
import ostinato
app = ostinato.App("good")

@app.loop(pause="100ms")
def tick(ctx):
    pass
"""


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.py"
    path.write_text(APP)
    return path


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes TCP handshakes and then never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _start(app_file: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*OSTINATO, "run", f"{app_file}:app", "--coordinator", url],
            stdout=out, stderr=subprocess.STDOUT, cwd=app_file.parent,
        )


def _wait_for_line(log: Path, words: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if words in log.read_text(errors="replace"):
            return
        time.sleep(0.02)
    raise AssertionError(f"no {words!r} in the runner's output:\n{log.read_text()}")


def _stopped_within(proc: subprocess.Popen[bytes], sig: signal.Signals, seconds: float) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("server", "sig"), [
    ("redis-refused", signal.SIGTERM), ("redis-refused", signal.SIGINT),
    ("redis-silent", signal.SIGTERM), ("postgres-silent", signal.SIGINT),
])
def test_a_runner_waiting_for_its_coordinator_stops_on_a_signal(
    app_file: Path, tmp_path: Path, silent_port: int, server: str, sig: signal.Signals,
) -> None:
    """While the coordinator cannot be reached (nothing listens, or it never answers), the
    runner retries and says so, and SIGTERM or SIGINT ends it with status 0."""
    url = {
        "redis-refused": f"redis://127.0.0.1:{_free_port()}/0",
        "redis-silent": f"redis://127.0.0.1:{silent_port}/0",
        "postgres-silent": f"postgresql://127.0.0.1:{silent_port}/test",
    }[server]
    log = tmp_path / "runner.log"
    proc = _start(app_file, url, log)
    _wait_for_line(log, "unreachable, retrying")
    # Generous for a loaded machine: the point is that it ends at all (bench measures how fast).
    assert _stopped_within(proc, sig, 5.0) == 0, log.read_text()


@pytest.mark.backend
def test_a_runner_whose_coordinator_hangs_mid_run_stops_on_a_signal(
    app_file: Path, tmp_path: Path
) -> None:
    """A Redis server frozen (SIGSTOP) under a running runner does not hold up its exit:
    the lease it cannot release is left to expire."""
    server = ThrowawayRedis(tmp_path)
    server.start()
    log = tmp_path / "runner.log"
    proc = _start(app_file, server.url, log)
    try:
        _wait_for_line(log, "lease acquired")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        # Waiting out each call's own timeout (2 s for a release, 2 s for the last
        # report) would take over 4 s; the farewell calls are cut short well before.
        assert _stopped_within(proc, signal.SIGTERM, 3.0) == 0, log.read_text()
        assert "could not release the lease, it will expire" in log.read_text()
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


@pytest.mark.backend
@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("server", ["redis", "postgres"])
def test_a_coordinator_url_the_server_refuses_is_one_line_and_status_2(
    app_file: Path, command: str, server: str
) -> None:
    """A database the server does not have is a wrong setting, not an outage: one line, exit 2."""
    if server == "redis":
        url = redis_url().rsplit("/", 1)[0] + "/99"
    else:
        url = postgres_url().rsplit("/", 1)[0] + "/no_such_database"
    args = ["run", f"{app_file}:app"] if command == "run" else ["status"]
    result = subprocess.run(
        [*OSTINATO, *args, "--coordinator", url], capture_output=True, text=True, timeout=30,
        cwd=app_file.parent,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ostinato: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert ("DB index is out of range" if server == "redis" else "does not exist") in errors[0]
