"""Find (or start) the Redis and PostgreSQL servers the backend tests talk to.

``REDIS_URL`` and ``DATABASE_URL`` name them (defaults: the local servers).
Where none answers, a throwaway server is started from ``redis-server`` or
``initdb``/``pg_ctl`` on the PATH. Where that fails too the tests are skipped
with one loud line, unless ``OSTINATO_REQUIRE_BACKENDS=1`` (set by CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REDIS_DEFAULT = "redis://127.0.0.1:6379/15"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), 1.0):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unavailable(what: str, why: str) -> None:
    message = f"{what} tests cannot run: {why}"
    if os.environ.get("OSTINATO_REQUIRE_BACKENDS") == "1":
        pytest.fail(message + " (OSTINATO_REQUIRE_BACKENDS=1 makes this a failure)")
    print(f"\n*** SKIPPING {message} ***", file=sys.stderr)
    pytest.skip(message)


def _wait_port(port: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _answers(f"x://127.0.0.1:{port}", port):
            return True
        time.sleep(0.05)
    return False


@functools.cache
def _start_redis() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    atexit.register(proc.terminate)
    if not _wait_port(port):
        return None
    # A Redis up for less than RESTART_QUIET (1 s, counted in whole seconds) grants
    # no lease it has no fence for.
    time.sleep(2.05)
    return f"redis://127.0.0.1:{port}/15"


class ThrowawayRedis:
    """A redis-server of the test's own (no persistence) that it can kill and start
    again on the same port; skips the test where ``redis-server`` is not on the PATH."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on the PATH")
        self.binary, self.folder, self.port = binary, folder, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the server and wait until it answers; returns when it was started."""
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not _wait_port(self.port, 10.0):
            raise AssertionError("redis-server did not start")
        return started

    def kill(self) -> float:
        """kill -9 the server; returns when."""
        assert self.proc is not None
        at = time.monotonic()
        self.proc.kill()
        self.proc.wait()
        return at

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@functools.cache
def _start_postgres() -> str | None:
    bindir = None
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        bindir = candidate
        break
    initdb = shutil.which("initdb") or (str(bindir / "initdb") if bindir else None)
    pg_ctl = shutil.which("pg_ctl") or (str(bindir / "pg_ctl") if bindir else None)
    if not initdb or not pg_ctl or not Path(initdb).exists() or os.geteuid() == 0:
        return None
    data = tempfile.mkdtemp(prefix="ostinato-pg-")
    port = _free_port()
    subprocess.run([initdb, "-D", data, "-U", "postgres", "-A", "trust"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([pg_ctl, "-D", data, "-o", f"-p {port} -k {data}", "-w", "start"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        with contextlib.suppress(Exception):
            subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "stop"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(data, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def redis_url() -> str:
    """A Redis server to test against, or skip (fail under CI) saying why."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("Redis", "the redis package is not installed (pip install 'ostinato[redis]')")
    url = os.environ.get("REDIS_URL", REDIS_DEFAULT)
    if _answers(url, 6379):
        return url
    started = _start_redis()
    if started is None:
        _unavailable("Redis", f"nothing answers at {url} and no redis-server is on the PATH")
    assert started is not None
    return started


def postgres_url() -> str:
    """A PostgreSQL server to test against, or skip (fail under CI) saying why."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("PostgreSQL", "psycopg is not installed (pip install 'ostinato[postgres]')")
    url = os.environ.get("DATABASE_URL", POSTGRES_DEFAULT)
    if _answers(url, 5432):
        return url
    started = _start_postgres()
    if started is None:
        _unavailable("PostgreSQL", f"nothing answers at {url} and initdb/pg_ctl cannot start one")
    assert started is not None
    return started
