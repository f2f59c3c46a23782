"""The short fault matrix: real runners, one kind of fault each, checked from what they recorded.

SQLite gets every fault that applies to it; Redis and PostgreSQL a blackhole
and the faults that once broke them (the full matrix is ``make chaos``); and a
few cross-host cells, each runner on a simulated host of its own (root only).
Each cell must keep every guarantee the checker knows, and show the fault it
was given actually happened.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos import records
from tests.chaos.backends import BACKENDS, Backend, Unavailable
from tests.chaos.checker import Report
from tests.chaos.harness import Outcome, Scenario, run_scenario
from tests.chaos.nemesis import FAULTS
from tests.chaos.netsim import Net, NetUnavailable

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SEED = int(os.environ.get("CHAOS_SEED", "1"))
SECONDS = 2.5
TTL = 1.0
# The faults that threaten the lease itself; the others (stop_short, contention, raise,
# hang) run in the full matrix (make chaos), and their effects in the runner's own tests.
SQLITE_CELLS = ("kill9", "stop_long", "pause_write", "sigterm", "clock_jump")
SQLITE_FAULTS = [name for name, fault in FAULTS.items() if "sqlite" in fault.backends
                 and name in SQLITE_CELLS]
# A network fault per server backend, and the cells of the full matrix (make chaos) that
# found bugs once (tests/chaos/README.md), so that they stay fixed.
SERVER_CELLS = [
    ("redis", "blackhole"), ("redis", "kill9"), ("redis", "server_restart"),
    ("postgres", "blackhole"), ("postgres", "conn_kill"), ("postgres", "server_restart"),
    ("postgres", "latency"),
]
# Across simulated hosts: a holder cut off whose server session is then ended, by the
# server's hand or by its TCP keepalive (the PostgreSQL holder once went on starting passes
# as a standby took over), one killed on its host, and a partition.
CROSS_HOST_CELLS = [("postgres", "cut_terminate"), ("postgres", "cut_keepalive"),
                    ("postgres", "host_kill9"), ("redis", "partition")]


def loud_skip(why: str, *, backend: bool = False) -> None:
    if backend and os.environ.get("OSTINATO_REQUIRE_BACKENDS") == "1":
        pytest.fail(f"{why} (OSTINATO_REQUIRE_BACKENDS=1 makes this a failure)")
    print(f"\n*** SKIPPING {why} ***", file=sys.stderr)
    pytest.skip(why)


@pytest.fixture(scope="module")
def backend() -> Iterator[Callable[[str], Backend]]:
    """Backends opened once for the module (the suite's own Redis server among them)."""
    opened: dict[str, Backend] = {}

    def get(name: str) -> Backend:
        if name not in opened:
            made = BACKENDS[name]()
            try:
                made.open()
            except Unavailable as exc:
                loud_skip(f"chaos tests on {name}: {exc}", backend=True)
            opened[name] = made
        return opened[name]

    yield get
    for made in opened.values():
        made.close()


@pytest.fixture(scope="module")
def hosts() -> Iterator[Net]:
    """Three simulated hosts for the module (root only)."""
    net = Net(3)
    try:
        net.open()
    except NetUnavailable as exc:
        loud_skip(f"the cross-host chaos tests: {exc}")
    yield net
    net.close()


@pytest.fixture(scope="module")
def host_backend(hosts: Net) -> Iterator[Callable[[str], Backend]]:
    """Servers of the suite's own that listen on the coordinator host's simulated address too."""
    opened: dict[str, Backend] = {}

    def get(name: str) -> Backend:
        if name not in opened:
            made = BACKENDS[name]()
            made.serve_hosts(hosts.coordinator_address)
            try:
                made.open()
            except Unavailable as exc:
                loud_skip(f"cross-host chaos tests on {name}: {exc}", backend=True)
            opened[name] = made
        return opened[name]

    yield get
    for made in opened.values():
        made.close()


def run_outcome(get: Callable[[str], Backend], tmp_path: Path, coordinator: str, fault: str,
                plant: str = "", work_ms: float = 10.0, net: Net | None = None) -> Outcome:
    scenario = Scenario(coordinator, fault, SEED, SECONDS, runners=3, loops=10, ttl=TTL, plant=plant,
                        work_ms=work_ms)
    outcome: Outcome = run_scenario(scenario, get(coordinator), tmp_path, net)
    if outcome.report is None:
        loud_skip(f"{fault} on {coordinator}: {outcome.skipped}")
    assert outcome.report is not None
    assert outcome.injections >= 1
    assert outcome.report.passes > 0
    return outcome


def run_cell(get: Callable[[str], Backend], tmp_path: Path, coordinator: str, fault: str,
             plant: str = "", work_ms: float = 10.0) -> Report:
    report = run_outcome(get, tmp_path, coordinator, fault, plant, work_ms).report
    assert report is not None
    return report


def holds_up(report: Report) -> str:
    return "\n".join(report.problems) or "ok"


def shows_its_fault(fault: str, report: Report) -> None:
    """What each fault must have visibly done, so that a fault that did nothing cannot pass."""
    if fault in ("kill9", "stop_long", "pause_write", "sigterm", "blackhole"):
        assert report.failover_s, "the fault took no loop from its holder"
        # Guarantee 2: a loop whose holder died, froze or was cut off resumes within its TTL
        # (counted from the fault; a stopped holder's lease runs from its last renewal).
        assert max(report.failover_s) < TTL + 0.5, report.failover_s
    if fault == "sigterm":
        assert max(report.failover_s) < 0.5  # a released lease is taken over at once
    if fault == "pause_write":
        assert report.stale_refused >= 1  # the paused holder's write came too late, and was refused
    if fault == "blackhole":
        # The cut-off holder stops its passes before its lease can run out at the server.
        assert report.detection_s
        assert max(report.detection_s) < TTL
    if fault in ("server_restart", "conn_kill"):
        assert report.failover_s, "no loop was granted again under a new fence"
    if fault == "raise":
        assert report.failed_passes > 0
    if fault == "hang":
        assert report.max_gap >= 2 * TTL


@pytest.mark.parametrize("fault", SQLITE_FAULTS)
def test_sqlite_keeps_its_guarantees_under(
    fault: str, backend: Callable[[str], Backend], tmp_path: Path,
) -> None:
    """Runners on one SQLite file: no overlap, no stale write, no spurious takeover, no silent stop."""
    report = run_cell(backend, tmp_path, "sqlite", fault)
    assert report.ok, holds_up(report)
    shows_its_fault(fault, report)


@pytest.mark.backend
@pytest.mark.parametrize(("coordinator", "fault"), SERVER_CELLS)
def test_server_backend_keeps_its_guarantees_under(
    coordinator: str, fault: str, backend: Callable[[str], Backend], tmp_path: Path,
) -> None:
    """Faults of the servers and the network between, through the proxy: the same guarantees."""
    report = run_cell(backend, tmp_path, coordinator, fault)
    assert report.ok, holds_up(report)
    shows_its_fault(fault, report)


@pytest.mark.backend
@pytest.mark.parametrize(("coordinator", "fault"), CROSS_HOST_CELLS)
def test_server_backend_keeps_its_guarantees_across_hosts_under(
    coordinator: str, fault: str, hosts: Net, host_backend: Callable[[str], Backend], tmp_path: Path,
) -> None:
    """Each runner on a simulated host of its own, one holder's link or process at fault: the
    same guarantees, and every loop taken from it starts elsewhere only after it stopped."""
    outcome = run_outcome(host_backend, tmp_path, coordinator, fault, net=hosts)
    report = outcome.report
    assert report is not None
    assert report.ok, holds_up(report)
    assert report.failover_s, "the fault took no loop from its holder"
    assert report.handover_margins
    assert report.stopped_first == len(report.handover_margins), report.handover_margins
    # Failover within two TTLs of the fault, however the holder was lost (a cut holder's
    # lease runs out a TTL after its last renewal; PostgreSQL frees a killed one's at once).
    assert max(report.failover_s) < 2 * TTL, report.failover_s
    assert outcome.run is not None
    history = records.load(outcome.run)
    runners = {life.pid: life for life in history.runners}
    assert history.faults
    for fault_seen in history.faults:
        assert fault_seen.target is not None
        assert fault_seen.detail["host"] is not None  # it was aimed at a simulated host
        if fault == "cut_terminate":
            assert fault_seen.detail["terminated"] > 0
            assert fault_seen.detail["sessions_before_heal"]["connections"] == 0
        if fault == "cut_keepalive":  # the server itself ended the lease session
            assert "lock_holders" in fault_seen.detail["dropped_at"], fault_seen.detail
        if fault == "host_kill9":
            assert runners[fault_seen.target].code == -9
    if fault == "partition":
        assert report.detection_s
        assert max(report.detection_s) < TTL  # the cut-off holder stops before its lease runs out


@pytest.mark.parametrize("plant", ["skip_lease_check", "skip_lease_check,unfenced_store"])
def test_the_checker_catches_a_planted_bug(
    plant: str, backend: Callable[[str], Backend], tmp_path: Path,
) -> None:
    """A runner that skips the lease check overlaps the new holder; unfenced, its writes get in."""
    # Passes longer than the pause between them, so two holders cannot miss each other.
    report = run_cell(backend, tmp_path, "sqlite", "stop_long", plant, work_ms=100)
    assert not report.ok
    assert report.overlaps > 0
    assert report.fence_violations > 0  # the stale holder starts passes after the new one did
    if "unfenced_store" in plant:
        assert report.stale_accepted > 0
    else:
        # The fenced store still refuses every stale write: the fence does its job.
        assert report.stale_accepted == 0
        assert report.stale_refused > 0
