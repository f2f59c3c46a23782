"""The coordinator goes away while runners work, then comes back."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.history import fences_only_grow, overlaps
from tests.process.conftest import Cluster

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throwaway redis-server that the test can kill and start again on the same port."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on the PATH")
        self.binary, self.tmp, self.port = binary, tmp, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def kill(self) -> float:
        assert self.proc is not None
        at = time.monotonic()
        self.proc.kill()
        self.proc.wait()
        return at


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def test_runners_stop_during_a_redis_outage_and_resume_after(
    cluster_factory: Callable[..., Cluster], redis_server: RedisServer,
) -> None:
    """Redis killed for 3 s (its data lost): no pass starts without a lease; passes resume after."""
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    lease = 1.0
    cluster = cluster_factory(url, lease="1s")
    cluster.start()
    cluster.start()
    cluster.wait(lambda: len(cluster.passes()) > 50, what="passes before the outage")
    fences_before = max(r.fence for r in cluster.passes())
    down = redis_server.kill()
    time.sleep(3.0)
    during = [r for r in cluster.passes() if r.start > down]
    # Passes may go on only while the lease taken before the outage is still valid.
    assert all(r.start < down + lease for r in during), during[-3:]
    redis_server.start()
    up = time.monotonic()
    cluster.wait(lambda: any(r.start > up for r in cluster.passes()), timeout=20,
                 what="passes after the outage")
    records = cluster.passes()
    after = [r for r in records if r.start > up]
    assert min(r.fence for r in after) > fences_before  # the fence survived the data loss
    assert overlaps(records) == []
    assert fences_only_grow(records)
    for proc in cluster.procs:
        assert proc.poll() is None  # nobody gave up
    cluster.stop_all()
    logs = cluster.logs()
    assert "cannot reach the coordinator" in logs or "lease lost" in logs
