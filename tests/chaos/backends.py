"""The coordinators under test, and what the nemesis can do to their servers.

* SQLite: a fresh file per run; no server, so no network faults.
* Redis: a ``redis-server`` the suite starts itself on a free port (``--save ""``),
  so it can be killed -9 and restarted; runners reach it through the proxy.
* PostgreSQL: a cluster the suite creates (``initdb``) and starts itself on a
  free port, so it can be killed -9 and restarted (crash recovery keeps every
  committed row; the advisory locks and connections are gone). Where
  ``initdb``/``pg_ctl`` are missing, the machine's server, never killed. Runners
  reach it through the proxy, each run in a schema of its own, and their
  connections are found by ``application_name`` for ``pg_terminate_backend``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import signal
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

    def __init__(self) -> None:
        self.data: Path | None = None
        self.pg_ctl: str | None = None

    def open(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is missing (pip install 'ostinato[postgres]')") from None
        binaries = self._binaries()
        if binaries is not None:
            self._create(*binaries)
            return
        try:
            url = servers.postgres_url()
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:
            raise Unavailable(str(exc)) from None
        parts = urlsplit(url)
        self.direct = url.split("?")[0]
        self.user = parts.username or "postgres"
        self.database = (parts.path or "/postgres").lstrip("/")
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)

    @staticmethod
    def _binaries() -> tuple[str, str] | None:
        folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)

        def find(name: str) -> str | None:
            return shutil.which(name) or next(
                (str(f / name) for f in folders if (f / name).exists()), None
            )

        initdb, pg_ctl = find("initdb"), find("pg_ctl")
        if initdb is None or pg_ctl is None:
            return None
        if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
            return None  # initdb refuses root
        return initdb, pg_ctl

    def _as_owner(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)

    def _create(self, initdb: str, pg_ctl: str) -> None:
        self.pg_ctl = pg_ctl
        self.data = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
        subprocess.run(self._as_owner(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.upstream = ("127.0.0.1", free_port())
        self.user, self.database = "postgres", "postgres"
        self.direct = f"postgresql://postgres@127.0.0.1:{self.upstream[1]}/postgres"
        self._start()
        self.restartable = True

    def _start(self) -> None:
        assert self.pg_ctl is not None
        assert self.data is not None
        options = (f"-p {self.upstream[1]} -k {self.data} -c listen_addresses=127.0.0.1"
                   " -c max_connections=300")
        subprocess.run(
            self._as_owner(self.pg_ctl, "-D", str(self.data), "-o", options, "-w", "-t", "60",
                           "-l", str(self.data / "server.log"), "start"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def _processes(self) -> list[int]:
        """The postmaster and its children."""
        assert self.data is not None
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def restart(self) -> None:
        if not self.restartable:
            raise Unavailable("the PostgreSQL server is not the suite's own")
        pids = self._processes()
        for pid in pids:  # the whole server at once, as an OOM kill or a crash would
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise Unavailable("the killed PostgreSQL processes did not go away")
            time.sleep(0.01)
        # A killed postmaster may linger as a zombie until init reaps it, which the
        # server would take for a live one: its lock files are stale, so they go.
        assert self.data is not None
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        (self.data / f".s.PGSQL.{self.upstream[1]}.lock").unlink(missing_ok=True)
        self._start()

    def close(self) -> None:
        if self.data is None or self.pg_ctl is None:
            return
        with contextlib.suppress(Exception):
            subprocess.run(self._as_owner(self.pg_ctl, "-D", str(self.data), "-m", "immediate",
                                          "stop"),
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.data, ignore_errors=True)

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
        if self.restartable:
            return  # the server is ours and goes away
        import psycopg

        with psycopg.connect(self.direct, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "chaos_{tag}" CASCADE')


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


BACKENDS: dict[str, type[Backend]] = {
    "sqlite": SQLiteBackend, "redis": RedisBackend, "postgres": PostgresBackend,
}
