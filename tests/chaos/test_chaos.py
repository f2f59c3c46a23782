"""The short fault matrix: real runners, one kind of fault each, checked from what they recorded.

SQLite gets every fault that applies to it; Redis and PostgreSQL a blackhole
and the faults that once broke them (the full matrix is ``make chaos``); and a
few cross-host cells, each runner on a simulated host of its own (root only).
Each cell must keep every guarantee the checker knows, and show the fault it
was given actually happened.

A cell spends most of its time waiting (on its runners' start, on the fault,
on the recovery after it), so the cells run in two lanes side by side, one
cell at a time in each: the SQLite, planted-bug and Redis cells; the
PostgreSQL and cross-host cells. No more than two cells share the machine, as
the faults' timing bounds allow on a busy one (four lanes were faster, and
stretched the failovers of PostgreSQL's blackhole past its bound). The lanes
start with the module's first test, with the cells the session selected; each
test waits for its own cell's outcome and checks it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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


class Backends:
    """Backends opened on first use and kept for the module (the suite's own servers among
    them); ``hosts``: each server also listening on the simulated coordinator host's address."""

    def __init__(self, hosts: Net | None = None) -> None:
        self.hosts = hosts
        self.opened: dict[str, Backend] = {}
        # One lock per backend: lanes of other backends go on while a server starts.
        self.locks = {name: threading.Lock() for name in BACKENDS}

    def get(self, name: str) -> Backend:
        with self.locks[name]:
            return self._get(name)

    def _get(self, name: str) -> Backend:
        if name not in self.opened:
            made = BACKENDS[name]()
            if self.hosts is not None:
                made.serve_hosts(self.hosts.coordinator_address)
            try:
                made.open()
            except Unavailable as exc:
                where = "cross-host chaos tests" if self.hosts is not None else "chaos tests"
                loud_skip(f"{where} on {name}: {exc}", backend=True)
            self.opened[name] = made
        return self.opened[name]

    def close(self) -> None:
        for made in self.opened.values():
            made.close()


@dataclass(frozen=True)
class Cell:
    """One cell of the short matrix, as a test asks for it."""

    coordinator: str
    fault: str
    plant: str = ""
    work_ms: float = 10.0
    hosts: bool = False

    @property
    def lane(self) -> str:
        """Two lanes of about the same length; the cells of one server (some restart it) and
        those on the simulated hosts each stay within one lane."""
        return "postgres-and-hosts" if self.hosts or self.coordinator == "postgres" else "sqlite-and-redis"


def cell_of(item: pytest.Item) -> Cell | None:
    """The cell a test of this module checks, from its parameters (None: not a cell's test)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = getattr(item, "originalname", "")
    if name == "test_sqlite_keeps_its_guarantees_under":
        return Cell("sqlite", params["fault"])
    if name == "test_server_backend_keeps_its_guarantees_under":
        return Cell(params["coordinator"], params["fault"])
    if name == "test_server_backend_keeps_its_guarantees_across_hosts_under":
        return Cell(params["coordinator"], params["fault"], hosts=True)
    if name == "test_the_checker_catches_a_planted_bug":
        # Passes longer than the pause between them, so two holders cannot miss each other.
        return Cell("sqlite", "stop_long", params["plant"], work_ms=100.0)
    return None


class Lanes:
    """The selected cells, run in lanes side by side; ``outcome`` waits for one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.backends = Backends()
        self.net: Net | None = None
        self.host_backends: Backends | None = None
        self.net_lock = threading.Lock()
        self.pools: dict[str, ThreadPoolExecutor] = {}
        self.cells: dict[Cell, Future[Outcome]] = {}

    def start(self, cell: Cell) -> Future[Outcome]:
        if cell not in self.cells:
            if cell.lane not in self.pools:
                self.pools[cell.lane] = ThreadPoolExecutor(1, thread_name_prefix=f"chaos-{cell.lane}")
            self.cells[cell] = self.pools[cell.lane].submit(self._run, cell)
        return self.cells[cell]

    def outcome(self, item: pytest.Item) -> Outcome:
        """The outcome of the cell the test ``item`` checks, once its lane has run it."""
        cell = cell_of(item)
        assert cell is not None, item.nodeid
        return self.start(cell).result()

    def _hosts(self) -> tuple[Net, Backends]:
        """Three simulated hosts (root only), and the servers that listen on their network."""
        with self.net_lock:
            if self.net is None:
                net = Net(3)
                try:
                    net.open()
                except NetUnavailable as exc:
                    loud_skip(f"the cross-host chaos tests: {exc}")
                self.net, self.host_backends = net, Backends(net)
            assert self.host_backends is not None
            return self.net, self.host_backends

    def _run(self, cell: Cell) -> Outcome:
        net, backends = self._hosts() if cell.hosts else (None, self.backends)
        workdir = self.workdir / cell.lane
        workdir.mkdir(exist_ok=True)
        return run_outcome(backends.get, workdir, cell.coordinator, cell.fault, cell.plant,
                           cell.work_ms, net)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.backends.close()
        if self.host_backends is not None:
            self.host_backends.close()
        if self.net is not None:
            self.net.close()


@pytest.fixture(scope="module")
def lanes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lanes]:
    """The lanes, started at once with every cell of this module the session selected."""
    made = Lanes(tmp_path_factory.mktemp("chaos"))
    for item in request.session.items:
        cell = cell_of(item) if getattr(item, "module", None) is request.module else None
        if cell is not None:
            made.start(cell)
    yield made
    made.close()


def run_outcome(get: Callable[[str], Backend], workdir: Path, coordinator: str, fault: str,
                plant: str = "", work_ms: float = 10.0, net: Net | None = None) -> Outcome:
    scenario = Scenario(coordinator, fault, SEED, SECONDS, runners=3, loops=10, ttl=TTL, plant=plant,
                        work_ms=work_ms)
    outcome: Outcome = run_scenario(scenario, get(coordinator), workdir, net)
    if outcome.report is None:
        loud_skip(f"{fault} on {coordinator}: {outcome.skipped}")
    return outcome


def checked(outcome: Outcome) -> Report:
    """The report of a cell whose fault was injected and whose runners ran passes."""
    assert outcome.report is not None
    assert outcome.injections >= 1
    assert outcome.report.passes > 0
    return outcome.report


def holds_up(report: Report, outcome: Outcome) -> str:
    return "\n".join([*report.problems, f"(the run directory: {outcome.run})"])


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
def test_sqlite_keeps_its_guarantees_under(fault: str, lanes: Lanes, request: pytest.FixtureRequest) -> None:
    """Runners on one SQLite file: no overlap, no stale write, no spurious takeover, no silent stop."""
    outcome = lanes.outcome(request.node)
    report = checked(outcome)
    assert report.ok, holds_up(report, outcome)
    shows_its_fault(fault, report)


@pytest.mark.backend
@pytest.mark.parametrize(("coordinator", "fault"), SERVER_CELLS)
def test_server_backend_keeps_its_guarantees_under(
    coordinator: str, fault: str, lanes: Lanes, request: pytest.FixtureRequest,
) -> None:
    """Faults of the servers and the network between, through the proxy: the same guarantees."""
    outcome = lanes.outcome(request.node)
    report = checked(outcome)
    assert report.ok, holds_up(report, outcome)
    shows_its_fault(fault, report)


@pytest.mark.backend
@pytest.mark.parametrize(("coordinator", "fault"), CROSS_HOST_CELLS)
def test_server_backend_keeps_its_guarantees_across_hosts_under(
    coordinator: str, fault: str, lanes: Lanes, request: pytest.FixtureRequest,
) -> None:
    """Each runner on a simulated host of its own, one holder's link or process at fault: the
    same guarantees, and every loop taken from it starts elsewhere only after it stopped."""
    outcome = lanes.outcome(request.node)
    report = checked(outcome)
    assert report.ok, holds_up(report, outcome)
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
def test_the_checker_catches_a_planted_bug(plant: str, lanes: Lanes, request: pytest.FixtureRequest) -> None:
    """A runner that skips the lease check overlaps the new holder; unfenced, its writes get in."""
    report = checked(lanes.outcome(request.node))
    assert not report.ok
    assert report.overlaps > 0
    assert report.fence_violations > 0  # the stale holder starts passes after the new one did
    if "unfenced_store" in plant:
        assert report.stale_accepted > 0
    else:
        # The fenced store still refuses every stale write: the fence does its job.
        assert report.stale_accepted == 0
        assert report.stale_refused > 0
