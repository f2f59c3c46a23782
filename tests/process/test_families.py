"""Partitions and keys in real runner processes on one SQLite file: the spread among three
runners, kill -9 and SIGSTOP of a holder, a key list that grows and shrinks while they work.

Every assertion is on what the passes recorded (pid, fence, start, end) for each member.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.history import PassRecord, fences_only_grow, overlaps
from tests.process.conftest import Cluster

pytestmark = pytest.mark.slow

SHARDS = [f"shard#{i}" for i in range(8)]


def spread(cluster: Cluster, members: list[str], since: float) -> dict[int, set[str]]:
    """Which runner ran which members' passes started after ``since``."""
    out: dict[int, set[str]] = {}
    for member in members:
        for record in cluster.passes(member):
            if record.start > since:
                out.setdefault(record.pid, set()).add(member)
    return out


def settled_spread(cluster: Cluster, members: list[str], window: float = 1.0) -> list[int]:
    """How many members each runner ran in the last ``window`` seconds, when no member ran on
    two runners in it (else ``[]``)."""
    now = time.monotonic()
    seen = spread(cluster, members, now - window)
    if sum(len(m) for m in seen.values()) != len({x for m in seen.values() for x in m}):
        return []
    return sorted(len(m) for m in seen.values())


def member_records(cluster: Cluster, members: list[str]) -> dict[str, list[PassRecord]]:
    return {member: cluster.passes(member) for member in members}


def test_eight_partitions_spread_3_3_2_and_survive_kill_9_and_sigstop(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(lease="2s", loops="0", drain="0", partitions="8", work_ms="5")
    for _ in range(3):
        cluster.start()
    cluster.wait(lambda: settled_spread(cluster, SHARDS) == [2, 3, 3], timeout=40,
                 what="8 partitions spread 3/3/2 over 3 runners")

    # kill -9 a runner holding three: each of its partitions runs elsewhere within the TTL + 2 s.
    now = time.monotonic()
    owners = spread(cluster, SHARDS, now - 1.0)
    victim = next(pid for pid, members in owners.items() if len(members) == 3)
    orphans = owners[victim]
    killed = cluster.kill(victim)

    def resumed() -> bool:
        later = spread(cluster, sorted(orphans), killed)
        return {m for pid, members in later.items() if pid != victim for m in members} == orphans

    cluster.wait(resumed, timeout=10, what="the killed runner's partitions to run elsewhere")
    for member in orphans:
        first = min(r.start for r in cluster.passes(member) if r.start > killed and r.pid != victim)
        assert first - killed < 2.0 + 2.0, member
    cluster.wait(lambda: settled_spread(cluster, SHARDS) == [4, 4], timeout=30,
                 what="the two survivors to share the 8 partitions")

    # SIGSTOP one survivor: its partitions move to the last runner after the TTL, and once
    # continued it starts no pass under the fences it had.
    owners = spread(cluster, SHARDS, time.monotonic() - 1.0)
    frozen = next(iter(owners))
    held = owners[frozen]
    old_fences = {m: max(r.fence for r in cluster.passes(m) if r.pid == frozen) for m in held}
    stopped = cluster.kill(frozen, signal.SIGSTOP)
    cluster.wait(lambda: all(any(r.start > stopped and r.pid != frozen for r in cluster.passes(m))
                             for m in held), timeout=15, what="the frozen runner's partitions to move")
    cluster.kill(frozen, signal.SIGCONT)
    time.sleep(1.5)
    records = member_records(cluster, SHARDS)
    for member, mine in records.items():
        late = [r for r in mine if r.pid == frozen and r.fence <= old_fences.get(member, -1)
                and r.start > stopped + 0.01]
        assert late == [], f"{member}: the continued runner started passes with a stale fence"
        # The only overlap allowed: the pass the frozen runner was in when it was stopped.
        allowed = [pair for pair in overlaps(mine, unfinished_end=cluster.killed_at)
                   if pair[0].pid == frozen and pair[0].start <= stopped + 0.01]
        assert overlaps(mine, unfinished_end=cluster.killed_at) == allowed, member
        assert fences_only_grow([r for r in mine if r.start > stopped] or mine), member


def test_a_key_list_that_grows_and_shrinks_while_three_runners_work(
    cluster_factory: Callable[..., Cluster], tmp_path: Path,
) -> None:
    keys = tmp_path / "tenants.txt"
    keys.write_text("acme\nglobex\ninitech\n")
    cluster = cluster_factory(lease="2s", loops="0", drain="0", keys_file=str(keys), work_ms="5")
    for _ in range(3):
        cluster.start()
    first = ["tenant[acme]", "tenant[globex]", "tenant[initech]"]
    cluster.wait(lambda: all(cluster.passes(m) for m in first), timeout=30, what="the first keys")

    keys.write_text("acme\nglobex\ninitech\numbrella\nhooli\n")
    grown = time.monotonic()
    new = ["tenant[umbrella]", "tenant[hooli]"]
    cluster.wait(lambda: all(cluster.passes(m) for m in new), timeout=10, what="the new keys")
    for member in new:
        # Within refresh (0.5 s) plus a second, with room for process start-up noise.
        assert min(r.start for r in cluster.passes(member)) - grown < 0.5 + 1.0 + 1.0, member

    keys.write_text("globex\nhooli\n")
    shrunk = time.monotonic()
    gone = ["tenant[acme]", "tenant[initech]", "tenant[umbrella]"]
    time.sleep(2.5)
    for member in gone:
        # The holder finishes the pass it is in, then lets go: nothing starts a second after.
        assert [r for r in cluster.passes(member) if r.start > shrunk + 1.5] == [], member
    status = cluster.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    members = sorted(row["member"] for row in json.loads(status.stdout)["loops"] if row["member"])
    assert members == ["[globex]", "[hooli]"]
    listed = cluster.cli("keys", "work:tenant")
    assert listed.stdout.split() == ["globex", "hooli"]
    for member, mine in member_records(cluster, first + new).items():
        assert overlaps(mine) == [], member
        assert fences_only_grow(mine), member
