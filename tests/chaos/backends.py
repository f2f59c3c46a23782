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

For the cross-host cells (``netsim``), ``serve_hosts`` before ``open`` makes the
suite's own server listen on the coordinator host's simulated address too, with
TCP keepalives of a few seconds (so that the server itself drops a session whose
host went silent), and runners on simulated hosts connect to it there directly.
``server_clock`` restarts the server with a wall clock the harness can step:
libfaketime for PostgreSQL (``FAKETIME_NO_CACHE=1``), and for Redis, which
libfaketime 0.9.10 cannot start, ``clockshim.c`` compiled here with gcc.
"""

from __future__ import annotations

import abc
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import servers

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CLOCK_SHIM = Path(__file__).with_name("clockshim.c")
#: Keepalives when serving simulated hosts: a silent peer is dropped after a few seconds.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 1, 1, 2
KEEPALIVE_S = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT


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


class ServerClock(abc.ABC):
    """A server's wall clock, ``offset`` seconds off the real one, stepped at run time."""

    offset = 0.0

    @abc.abstractmethod
    def env(self) -> dict[str, str]:
        """What the server's environment needs to run on this clock."""

    @abc.abstractmethod
    def set(self, offset: float) -> None:
        """Step the clock to ``offset`` seconds off the real one (taken at once)."""


class FaketimeClock(ServerClock):
    """libfaketime, reading its offset file on every call (``FAKETIME_NO_CACHE=1``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "faketime"
        self.set(0.0)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "DONT_FAKE_MONOTONIC": "1"}

    def set(self, offset: float) -> None:
        staged = self.path.with_suffix(".new")
        staged.write_text(f"{offset:+.0f}\n")
        staged.chmod(0o644)
        os.replace(staged, self.path)  # never half a file for a reader
        self.offset = offset


class ShimClock(ServerClock):
    """``clockshim.c``, compiled here: the offset is 8 bytes of nanoseconds the server maps."""

    def __init__(self, folder: Path) -> None:
        self.library = folder / "clockshim.so"
        done = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(self.library),
                               str(CLOCK_SHIM)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise Unavailable(f"the clock shim did not compile: {done.stderr.strip()[:300]}")
        self.path = folder / "clock-offset"
        self.path.write_bytes(struct.pack("<q", 0))
        self.path.chmod(0o644)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "CHAOS_CLOCK_FILE": str(self.path)}

    def set(self, offset: float) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<q", round(offset * 1e9)), 0)
        finally:
            os.close(fd)
        self.offset = offset


class Backend(abc.ABC):
    """One coordinator backend, set up once for a whole column of the matrix."""

    name: str = ""
    #: Runners reach it over TCP, through the proxy.
    network = False
    #: Its server can be killed -9 and restarted.
    restartable = False
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    #: Where runners on simulated hosts reach the server (``serve_hosts``), once it listens there.
    hosts_address: str | None = None
    #: The server's wall clock, when it runs on one the harness can step (``server_clock``).
    clock: ServerClock | None = None

    def serve_hosts(self, address: str) -> None:
        """Before ``open``: listen on ``address`` too (the coordinator's simulated host)."""
        self._serve_address = address

    @property
    def serving(self) -> str | None:
        """The simulated address asked for with ``serve_hosts``, if any."""
        return getattr(self, "_serve_address", None)

    def open(self) -> None:  # noqa: B027 - most backends need nothing
        """Make the server ready, or raise ``Unavailable``."""

    def close(self) -> None:  # noqa: B027
        """Stop what ``open`` started."""

    @abc.abstractmethod
    def url(self, run: Path, tag: str, port: int | None) -> str:
        """The coordinator URL for one runner of run ``tag`` (``port``: its proxy listener)."""

    def host_url(self, run: Path, tag: str) -> str:
        """The coordinator URL for a runner on a simulated host (direct, no proxy)."""
        raise Unavailable(f"{self.name} is not reached over the network")

    def kill_connections(self, tag: str, client: str | None = None) -> int:
        """Close the runners' connections (only those from address ``client``, if given)
        from the server side; return how many."""
        raise Unavailable(f"{self.name} has no server connections")

    def sessions(self, tag: str, client: str) -> dict[str, int]:
        """How many of the runners' sessions the server has from address ``client``."""
        return {}

    def restart(self) -> None:
        """Kill -9 the server and start it again."""
        raise Unavailable(f"{self.name} has no server the suite may restart")

    def server_time(self) -> float:
        """The server's wall clock now (seconds since the epoch), as the server reads it."""
        raise Unavailable(f"{self.name} has no server clock")

    def clock_unavailable(self) -> str | None:
        """Why ``server_clock`` cannot work here, or None."""
        return f"{self.name} has no server the suite may restart"

    def server_clock(self, offset: float | None) -> None:
        """Set the server's wall clock ``offset`` seconds off the real one, restarting the
        server on a clock that can step if it is not on one yet; None: back on the real clock
        (restarting it)."""
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
        argv = [self.binary, "--port", str(port), "--bind", "127.0.0.1", *self._hosts_args(),
                "--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        env = {**os.environ, **(self.clock.env() if self.clock is not None else {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env)
        if not wait_port(port):
            raise Unavailable(f"redis-server did not answer on port {port}")
        if self.serving:
            self.hosts_address = self.serving

    def restart(self) -> None:
        if not self.restartable or self.proc is None:
            raise Unavailable("the Redis server is not the suite's own")
        self.proc.kill()
        self.proc.wait(10)
        self._start()

    def _hosts_args(self) -> list[str]:
        """Listen on the simulated address too; its runners come with no password; a silent
        peer is dropped after a few seconds (Redis derives the probes' interval and count)."""
        if not self.serving:
            return []
        return [self.serving, "--protected-mode", "no", "--tcp-keepalive", str(KEEPALIVE_IDLE)]

    def clock_unavailable(self) -> str | None:
        if not self.restartable:
            return "the Redis server is not the suite's own"
        if shutil.which("gcc") is None:
            return "gcc is missing, for the clock shim (libfaketime cannot start redis-server)"
        return None

    def server_clock(self, offset: float | None) -> None:
        if offset is not None and self.clock is not None:
            self.clock.set(offset)
            return
        if offset is None and self.clock is None:
            return
        if not self.restartable or self.proc is None or self.folder is None:
            raise Unavailable("the Redis server is not the suite's own")
        self.clock = ShimClock(Path(self.folder)) if offset is not None else None
        if self.clock is not None:
            self.clock.set(offset or 0.0)
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

    def host_url(self, run: Path, tag: str) -> str:
        if self.hosts_address is None:
            raise Unavailable("the Redis server does not listen on the simulated hosts' network")
        return f"redis://{self.hosts_address}:{self.upstream[1]}/0?prefix=chaos-{tag}"

    def _client(self) -> Any:
        import redis

        return redis.Redis(host=self.upstream[0], port=self.upstream[1], socket_timeout=5)

    def _mine(self, client: Any, tag: str, address: str | None) -> list[dict[str, Any]]:
        return [c for c in client.client_list() if c.get("name") == f"ostinato:chaos-{tag}"
                and (address is None or str(c.get("addr", "")).rpartition(":")[0] == address)]

    def kill_connections(self, tag: str, client: str | None = None) -> int:
        server = self._client()
        try:
            mine = self._mine(server, tag, client)
            for found in mine:
                with contextlib.suppress(Exception):
                    server.client_kill_filter(_id=found["id"])
            return len(mine)
        finally:
            server.close()

    def sessions(self, tag: str, client: str) -> dict[str, int]:
        server = self._client()
        try:
            return {"connections": len(self._mine(server, tag, client))}
        finally:
            server.close()

    def server_time(self) -> float:
        server = self._client()
        try:
            seconds, micros = server.time()
            return float(seconds) + micros / 1e6
        finally:
            server.close()

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
        if self.serving:
            with (self.data / "pg_hba.conf").open("a") as hba:
                network = ipaddress.ip_network(f"{self.serving}/24", strict=False)
                hba.write(f"host all all {network} trust\n")
        self.upstream = ("127.0.0.1", free_port())
        self.user, self.database = "postgres", "postgres"
        self.direct = f"postgresql://postgres@127.0.0.1:{self.upstream[1]}/postgres"
        self._start()
        self.restartable = True

    def _start(self) -> None:
        assert self.pg_ctl is not None
        assert self.data is not None
        listen = "127.0.0.1" + (f",{self.serving}" if self.serving else "")
        options = (f"-p {self.upstream[1]} -k {self.data} -c listen_addresses={listen}"
                   " -c max_connections=300")
        if self.serving:
            # The server itself drops a session whose host went silent, within seconds:
            # keepalives when it was idle, and tcp_user_timeout when an answer of its was
            # still unacknowledged (the kernel sends no keepalive probe then).
            options += (f" -c tcp_keepalives_idle={KEEPALIVE_IDLE}"
                        f" -c tcp_keepalives_interval={KEEPALIVE_INTERVAL}"
                        f" -c tcp_keepalives_count={KEEPALIVE_COUNT}"
                        f" -c tcp_user_timeout={KEEPALIVE_S * 1000}")
        clock = [f"{k}={v}" for k, v in self.clock.env().items()] if self.clock is not None else []
        subprocess.run(
            self._as_owner("env", *clock, self.pg_ctl, "-D", str(self.data), "-o", options, "-w",
                           "-t", "60", "-l", str(self.data / "server.log"), "start"),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if self.serving:
            self.hosts_address = self.serving

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

    def clock_unavailable(self) -> str | None:
        if not self.restartable:
            return "the PostgreSQL server is not the suite's own"
        if not FAKETIME_LIB.exists():
            return f"libfaketime is missing ({FAKETIME_LIB}); apt-get install faketime"
        return None

    def server_clock(self, offset: float | None) -> None:
        if offset is not None and self.clock is not None:
            self.clock.set(offset)
            return
        if offset is None and self.clock is None:
            return
        if not self.restartable or self.data is None or self.pg_ctl is None:
            raise Unavailable("the PostgreSQL server is not the suite's own")
        subprocess.run(self._as_owner(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.clock = FaketimeClock(self.data) if offset is not None else None
        if self.clock is not None:
            self.clock.set(offset or 0.0)
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

    def host_url(self, run: Path, tag: str) -> str:
        if self.hosts_address is None:
            raise Unavailable("the PostgreSQL server does not listen on the simulated hosts' network")
        return (f"postgresql://{self.user}@{self.hosts_address}:{self.upstream[1]}/{self.database}"
                f"?schema=chaos_{tag}&application_name=chaos-{tag}")

    def kill_connections(self, tag: str, client: str | None = None) -> int:
        import psycopg

        with psycopg.connect(self.direct, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"
                " AND (%s::inet IS NULL OR client_addr = %s::inet)",
                [f"chaos-{tag}", client, client],
            ).fetchall()
        return len(rows)

    def sessions(self, tag: str, client: str) -> dict[str, int]:
        """The sessions from ``client``, and those of them holding an advisory (lease) lock."""
        import psycopg

        with psycopg.connect(self.direct, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE EXISTS (SELECT 1 FROM pg_locks l"
                " WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted))"
                " FROM pg_stat_activity a WHERE application_name = %s AND client_addr = %s::inet",
                [f"chaos-{tag}", client],
            ).fetchone()
        assert row is not None
        return {"connections": int(row[0]), "lock_holders": int(row[1])}

    def server_time(self) -> float:
        import psycopg

        with psycopg.connect(self.direct, autocommit=True) as conn:
            row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        assert row is not None
        return float(row[0])

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
