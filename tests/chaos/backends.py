"""The coordinators under test, and what the nemesis can do to their servers.

* SQLite: a fresh file per run; no server, so no network faults.
* Redis: a ``redis-server`` the suite starts itself on a free port (``--save ""``),
  so it can be killed -9 and restarted; runners reach it through the proxy.
* PostgreSQL: the machine's server (shared, so never killed or restarted);
  runners reach it through the proxy, each run in a schema of its own, and
  their connections are found by ``application_name`` for ``pg_terminate_backend``.
"""

from __future__ import annotations

import abc
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import servers


class Unavailable(Exception):
    """This backend cannot be tested here; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if answers(port):
            return True
        time.sleep(0.02)
    return False


class Backend(abc.ABC):
    """One coordinator backend, set up once for a whole column of the matrix."""

    name: str = ""
    #: Runners reach it over TCP, through the proxy.
    network = False
    #: Its server can be killed -9 and restarted.
    restartable = False
    upstream: tuple[str, int] = ("127.0.0.1", 0)

    def open(self) -> None:  # noqa: B027 - most backends need nothing
        """Make the server ready, or raise ``Unavailable``."""

    def close(self) -> None:  # noqa: B027
        """Stop what ``open`` started."""

    @abc.abstractmethod
    def url(self, run: Path, tag: str, port: int | None) -> str:
        """The coordinator URL for one runner of run ``tag`` (``port``: its proxy listener)."""

    def kill_connections(self, tag: str) -> int:
        """Close the runners' connections from the server side; return how many."""
        raise Unavailable(f"{self.name} has no server connections")

    def restart(self) -> None:
        """Kill -9 the server and start it again."""
        raise Unavailable(f"{self.name} has no server the suite may restart")

    def cleanup(self, tag: str) -> None:  # noqa: B027
        """Remove what run ``tag`` left in the server."""


class SQLiteBackend(Backend):
    name = "sqlite"

    def url(self, run: Path, tag: str, port: int | None) -> str:
        return f"sqlite:///{run.resolve() / 'coord.db'}"


class RedisBackend(Backend):
    name = "redis"
    network = True

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.proc: subprocess.Popen[bytes] | None = None
        self.folder: str | None = None

    def open(self) -> None:
        try:
            import redis  # noqa: F401
        except ImportError:
            raise Unavailable("the redis package is missing (pip install 'ostinato[redis]')") from None
        if self.binary is None:
            # No server of our own: use the machine's, but never kill it.
            try:
                url = servers.redis_url()
            except (pytest.skip.Exception, pytest.fail.Exception) as exc:
                raise Unavailable(str(exc)) from None
            parts = urlsplit(url)
            self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
            return
        self.folder = tempfile.mkdtemp(prefix="chaos-redis-")
        self.upstream = ("127.0.0.1", free_port())
        self._start()
        self.restartable = True

    def _start(self) -> None:
        assert self.binary is not None
        port = self.upstream[1]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_port(port):
            raise Unavailable(f"redis-server did not answer on port {port}")

    def restart(self) -> None:
        if not self.restartable or self.proc is None:
            raise Unavailable("the Redis server is not the suite's own")
        self.proc.kill()
        self.proc.wait(10)
        self._start()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, run: Path, tag: str, port: int | None) -> str:
        return f"redis://127.0.0.1:{port}/0?prefix=chaos-{tag}"

    def _client(self) -> Any:
        import redis

        return redis.Redis(host=self.upstream[0], port=self.upstream[1], socket_timeout=5)

    def kill_connections(self, tag: str) -> int:
        client = self._client()
        try:
            mine = [c["id"] for c in client.client_list() if c.get("name") == f"ostinato:chaos-{tag}"]
            for client_id in mine:
                with contextlib.suppress(Exception):
                    client.client_kill_filter(_id=client_id)
            return len(mine)
        finally:
            client.close()

    def cleanup(self, tag: str) -> None:
        if self.restartable:
            return  # the server is ours and goes away
        client = self._client()
        try:
            for key in client.scan_iter(match=f"chaos-{tag}:*", count=500):
                client.delete(key)
        finally:
            client.close()


class PostgresBackend(Backend):
    name = "postgres"
    network = True

    def open(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is missing (pip install 'ostinato[postgres]')") from None
        try:
            url = servers.postgres_url()
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:
            raise Unavailable(str(exc)) from None
        parts = urlsplit(url)
        self.direct = url.split("?")[0]
        self.user = parts.username or "postgres"
        self.database = (parts.path or "/postgres").lstrip("/")
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, run: Path, tag: str, port: int | None) -> str:
        return (f"postgresql://{self.user}@127.0.0.1:{port}/{self.database}"
                f"?schema=chaos_{tag}&application_name=chaos-{tag}")

    def kill_connections(self, tag: str) -> int:
        import psycopg

        with psycopg.connect(self.direct, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                [f"chaos-{tag}"],
            ).fetchall()
        return len(rows)

    def cleanup(self, tag: str) -> None:
        import psycopg

        with psycopg.connect(self.direct, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "chaos_{tag}" CASCADE')


BACKENDS: dict[str, type[Backend]] = {
    "sqlite": SQLiteBackend, "redis": RedisBackend, "postgres": PostgresBackend,
}
