"""The coordinator goes away while runners work, then comes back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.history import fences_only_grow, overlaps
from tests.process.conftest import Cluster
from tests.servers import ThrowawayRedis

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    pytest.importorskip("redis")
    server = ThrowawayRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_runners_stop_during_a_redis_outage_and_resume_after(
    cluster_factory: Callable[..., Cluster], redis_server: ThrowawayRedis,
) -> None:
    """Redis killed for 3 s (its data lost): no pass starts without a lease; passes resume after."""
    url = redis_server.url
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
