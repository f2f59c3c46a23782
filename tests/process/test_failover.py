"""Real runner processes on one SQLite file: kill -9, SIGSTOP and SIGTERM of the holder.

Every assertion is on what the passes recorded (pid, fence, start, end).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.history import fences_only_grow, overlaps
from tests.process.conftest import Cluster

pytestmark = pytest.mark.slow


def first_pass_after(cluster: Cluster, when: float, *, not_pid: int) -> float:
    cluster.wait(
        lambda: any(r.start > when and r.pid != not_pid for r in cluster.passes()),
        what="another runner to take over",
    )
    return min(r.start for r in cluster.passes() if r.start > when and r.pid != not_pid)


def lease_for(url: str) -> str:
    """SQLite and PostgreSQL notice a dead holder at once; Redis waits its (short) TTL out."""
    return "3s" if url.startswith("redis") else "10s"


def test_kill_9_of_the_holder_moves_the_loop_without_overlap(
    cluster_factory: Callable[..., Cluster], backend: str,
) -> None:
    """Kill -9 the holder twice among three runners: the loop resumes well inside the TTL each time."""
    cluster = cluster_factory(backend, lease=lease_for(backend), drain="0")
    for _ in range(3):
        cluster.start()
    killed = 0.0
    for _ in range(2):
        holder = cluster.holder(since=killed)
        cluster.wait(lambda h=holder: sum(r.pid == h for r in cluster.passes()) > 20, what="passes")
        killed = cluster.kill(holder)
        resumed = first_pass_after(cluster, killed, not_pid=holder)
        # Within a 10 s lease, resuming this fast means the dead holder was noticed, not
        # waited out; on Redis, within the 3 s TTL.
        assert resumed - killed < (5.0 if lease_for(backend) == "10s" else 3.5)
    records = cluster.passes()
    assert len({r.pid for r in records}) == 3
    assert overlaps(records, unfinished_end=cluster.killed_at) == []
    assert fences_only_grow(records)


def test_stopped_holder_loses_its_lease_and_starts_no_pass_with_its_stale_fence(
    cluster_factory: Callable[..., Cluster], backend: str,
) -> None:
    """A SIGSTOPped holder is replaced after its TTL and, once continued, runs nothing more."""
    cluster = cluster_factory(backend, lease="1s", drain="0")
    cluster.start()
    cluster.start()
    holder = cluster.holder()
    cluster.wait(lambda: len(cluster.passes()) > 20, what="passes")
    stopped = cluster.kill(holder, signal.SIGSTOP)
    first_pass_after(cluster, stopped, not_pid=holder)
    old_fence = max(r.fence for r in cluster.passes() if r.pid == holder)
    new_fence = min(r.fence for r in cluster.passes() if r.start > stopped and r.pid != holder)
    assert new_fence > old_fence
    cluster.kill(holder, signal.SIGCONT)
    # The continued holder must notice (its renewal fails) and then keep quiet; give it
    # a few renewal intervals, then look at what it did.
    time.sleep(1.5)
    # (It may win the loop back later, with a new fence: that is not stale.)
    # (10 ms of slack: the signal is sent right after the stop time is read.)
    late = [r for r in cluster.passes()
            if r.pid == holder and r.fence <= old_fence and r.start > stopped + 0.01]
    assert late == [], f"stale holder started {len(late)} pass(es) with its old fence"
    # The only overlap allowed is the pass the holder was in when it was stopped (the same
    # 10 ms of slack).
    allowed = [
        pair for pair in overlaps(cluster.passes())
        if pair[0].pid == holder and pair[0].start <= stopped + 0.01
    ]
    assert overlaps(cluster.passes()) == allowed
    assert fences_only_grow([r for r in cluster.passes() if r.start > stopped] or cluster.passes())


def test_sigterm_finishes_the_pass_releases_and_exits_0(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """SIGTERM: the holder exits 0 after its pass, and the standby takes over at once."""
    cluster = cluster_factory(lease="10s", work_ms="50", drain="0")
    first = cluster.start()
    holder = cluster.holder()
    assert holder == first.pid
    standby = cluster.start()
    cluster.wait(lambda: len(cluster.passes()) > 5, what="passes")
    time.sleep(0.5)  # let the standby start and be refused once
    term = cluster.kill(holder, signal.SIGTERM)
    assert first.wait(15) == 0, cluster.logs()
    resumed = first_pass_after(cluster, term, not_pid=holder)
    assert resumed - term < 5.0  # the 10 s TTL was not waited out
    records = cluster.passes()
    assert all(r.end is not None for r in records if r.pid == holder)  # its last pass finished
    assert overlaps(records) == []
    assert fences_only_grow(records)
    assert standby.poll() is None


def test_loops_spread_across_runners_and_the_survivors_take_all(
    cluster_factory: Callable[..., Cluster], backend: str,
) -> None:
    """3 runners, 9 loops: each ends up with 3; kill one and the other two hold all 9."""
    cluster = cluster_factory(backend, lease="3s", loops="8")  # 8 recording loops + drain = 9
    procs = [cluster.start() for _ in range(3)]

    def holders() -> dict[str, str | None]:
        result = cluster.cli("status", "--json")
        if result.returncode != 0:
            return {}
        return {row["loop"]: row["holder"] for row in json.loads(result.stdout)["loops"]}

    def spread() -> list[int]:
        counts = Counter(holders().values())
        return sorted(counts[f"{socket.gethostname()}:{p.pid}"] for p in procs if p.poll() is None)

    cluster.wait(lambda: spread() == [3, 3, 3], timeout=45, what="3 loops per runner")
    victim = procs[0]
    cluster.kill(victim.pid)
    victim.wait(10)
    cluster.wait(lambda: sum(spread()) == 9 and len(holders()) == 9, timeout=15,
                 what="the two survivors to hold all 9 loops")
    for loop in ["work", *(f"loop{n}" for n in range(1, 8))]:
        records = cluster.passes(loop)
        assert overlaps(records, unfinished_end=cluster.killed_at) == [], loop
        assert fences_only_grow(records), loop


def test_five_runners_hand_the_loop_down_the_line(cluster_factory: Callable[..., Cluster]) -> None:
    """Five runners, the holder stopped four times (kill -9, SIGTERM in turn): one pass at a time."""
    cluster = cluster_factory(lease="10s", drain="0")
    procs = {p.pid: p for p in (cluster.start() for _ in range(5))}
    at = 0.0
    for round_ in range(4):
        holder = cluster.holder(since=at)
        cluster.wait(lambda h=holder: sum(r.pid == h for r in cluster.passes()) > 5, what="passes")
        sig = signal.SIGKILL if round_ % 2 == 0 else signal.SIGTERM
        at = cluster.kill(holder, sig)
        code = procs[holder].wait(15)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        first_pass_after(cluster, at, not_pid=holder)
    records = cluster.passes()
    assert len({r.pid for r in records}) == 5
    assert overlaps(records, unfinished_end=cluster.killed_at) == []
    assert fences_only_grow(records)
