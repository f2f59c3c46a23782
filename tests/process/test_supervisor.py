"""``ostinato run --processes N``: N runners kept alive, and stopped together."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.history import fences_only_grow, overlaps
from tests.process.conftest import Cluster

pytestmark = pytest.mark.slow


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_supervisor_restarts_a_killed_runner_and_stops_cleanly(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """A runner killed under the supervisor is replaced; SIGTERM stops them all and exits 0."""
    cluster = cluster_factory(lease="10s", drain="0")
    supervisor = cluster.start("--processes", "2")
    cluster.wait(lambda: len(children(supervisor.pid)) == 2, what="two runners")
    holder = cluster.holder()
    assert holder in children(supervisor.pid)
    cluster.kill(holder)
    cluster.wait(lambda: len(children(supervisor.pid) - {holder}) == 2, timeout=20,
                 what="a replacement runner")
    cluster.wait(lambda: cluster.passes()[-1].pid != holder, what="passes in another runner")
    runners = children(supervisor.pid)
    os.kill(supervisor.pid, signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert all(gone(pid) for pid in runners)
    records = cluster.passes()
    assert overlaps(records, unfinished_end=cluster.killed_at) == []
    assert fences_only_grow(records)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie, or reaped, even as it is looked at)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
