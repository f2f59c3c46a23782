"""Real runner and dashboard processes for the monitoring tests, and the helpers to watch them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ostinato.coordinators import LoopRecord
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.dashboard import Board, bind, create_app
from tests.servers import _unavailable

T = TypeVar("T")

OSTINATO = [sys.executable, "-m", "ostinato"]
APP = f"{Path(__file__).with_name('observed.py')}:app"
SRC = Path(__file__).parents[2] / "src"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str]:
    """Status and body of an HTTP request to one of the test's own local servers."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)  # noqa: S310 - a local test server
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@dataclass
class Proc:
    """A process started by a test; its stdout and stderr go to ``log``."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines printed so far (``--log-format json``); other lines are skipped."""
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)


@dataclass
class Stack:
    """Runners of ``observed.py`` and dashboards sharing one SQLite coordinator in ``tmp``."""

    tmp: Path
    url: str
    env: dict[str, str]
    gate: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, *args: str, name: str = "proc") -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([*OSTINATO, *args], env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT)
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def runner(self, *extra: str) -> Proc:
        """An ``ostinato run`` of the observed app."""
        return self.start("run", APP, "--coordinator", self.url, *extra, name="runner")

    def dashboard(self, *extra: str) -> tuple[Proc, str]:
        """An ``ostinato dashboard`` on a free port, and its base URL (read from what it prints)."""
        proc = self.start("dashboard", "--coordinator", self.url, "--port", "0", *extra,
                          name="dashboard")

        def address() -> str | None:
            assert proc.popen.poll() is None, proc.output()
            for word in proc.output().split():
                if word.startswith("http://127.0.0.1:"):
                    return word.rstrip("/")
            return None

        base = wait_for(address, what="the dashboard's address")
        wait_for(lambda: get(f"{base}/api/loops")[0] == 200, what="the dashboard to answer")
        return proc, base

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*OSTINATO, *args, "--coordinator", self.url], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def status(self) -> dict[str, dict[str, Any]]:
        """``ostinato status --json``, by loop key."""
        result = self.cli("status", "--json")
        if result.returncode == 2 and "no coordinator found" in result.stderr:
            return {}  # no runner has made it yet
        assert result.returncode == 0, result.stderr
        return {f"{r['app']}:{r['loop']}": r for r in json.loads(result.stdout)["loops"]}

    def reported(self, *keys: str) -> bool:
        """Whether every loop in ``keys`` has reported passes to the coordinator."""
        rows = self.status()
        return all(rows.get(key, {}).get("passes", 0) > 0 for key in keys)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(10)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OSTINATO_TEST_GATE": str(tmp_path / "gate")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    for name in ("OSTINATO_COORDINATOR", "OSTINATO_METRICS_PORT", "OSTINATO_ALERT_WEBHOOK",
                 "OSTINATO_DASHBOARD_TOKEN", "OSTINATO_LOG_FORMAT"):
        env.pop(name, None)
    made = Stack(tmp_path, f"sqlite:///{tmp_path / 'ostinato.db'}", env, tmp_path / "gate")
    yield made
    made.stop_all()


class Webhook:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = status
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright; skipped loudly (failed under CI) if missing."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        _unavailable("Browser", "no chromium on this machine (make test installs it as root: "
                                "apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Browser", "playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class Scripted(MemoryCoordinator):
    """A coordinator whose loop table is whatever ``script(wall_now)`` says, for the page's tests."""

    def __init__(self, script: Callable[[float], list[LoopRecord]]) -> None:
        super().__init__(uuid.uuid4().hex)
        self.script = script

    async def loops(self) -> list[LoopRecord]:
        return self.script(time.time())


@contextmanager
def served(board: Board) -> Iterator[str]:
    """``board``'s dashboard served by uvicorn from a thread of this process; yields its base URL."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(board), log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="the dashboard to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
