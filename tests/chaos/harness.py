"""One chaos run: runners of the workload on one coordinator, one kind of fault, then the checker.

``run_scenario`` sets up a run directory, starts the runners (through a proxy
for the server backends; for a cross-host fault, each on a simulated host of its
own, straight to the server), waits until every loop has run, lets the nemesis
loose for ``seconds``, stops everything, and checks what was recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.chaos import records, store
from tests.chaos.backends import Backend
from tests.chaos.checker import Report, check
from tests.chaos.cluster import ROOT, Cluster, EventLog
from tests.chaos.nemesis import FAULTS, Nemesis, Stage
from tests.chaos.netsim import Net
from tests.chaos.proxy import Proxy


@dataclass(frozen=True)
class Scenario:
    """One cell of the matrix. ``plant`` names bugs to plant (for the checker's own test)."""

    coordinator: str
    fault: str
    seed: int
    seconds: float
    runners: int = 3
    loops: int = 10
    ttl: float = 1.0
    plant: str = ""
    #: How long to wait, at most, for the loops to spread across the runners first.
    settle: float = 1.0
    #: How long each pass works before its fenced write (it then pauses 50 ms).
    work_ms: float = 10.0

    @property
    def rng(self) -> random.Random:
        return random.Random(f"{self.seed}:{self.coordinator}:{self.fault}:{self.plant}")


@dataclass
class Outcome:
    """A finished run: its report, or why it was skipped."""

    scenario: Scenario
    report: Report | None = None
    skipped: str | None = None
    injections: int = 0
    run: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"scenario": asdict(self.scenario), "skipped": self.skipped,
                "injections": self.injections, "notes": self.notes,
                "report": None if self.report is None else self.report.to_dict()}


def wall_offset() -> float:
    """time.time() - time.monotonic(), the median of a few readings."""
    return statistics.median(time.time() - time.monotonic() for _ in range(9))


def runner_env(run: Path, scenario: Scenario) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSTINATO_", "CHAOS_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        PYTHONUNBUFFERED="1",
        CHAOS_RUN=str(run),
        CHAOS_LEASE=f"{scenario.ttl}s",
        CHAOS_LOOPS=str(scenario.loops),
        CHAOS_WORK_MS=f"{scenario.work_ms:g}",
        CHAOS_TIMEOUT=f"{scenario.ttl}s",
        CHAOS_STALL=f"{3 * scenario.ttl}s",
        CHAOS_PLANT=scenario.plant,
    )
    return env


def wait_warm(cluster: Cluster, run: Path, loops: int, timeout: float) -> None:
    """Until every loop has finished a pass somewhere."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {r.loop for r in records.read_passes(run / "passes") if r.end is not None}
        if len(done) >= loops:
            return
        cluster.reap()
        time.sleep(0.1)
    raise AssertionError(f"not every loop ran within {timeout}s; see {run / 'logs'}")


def wait_spread(cluster: Cluster, run: Path, scenario: Scenario, timeout: float) -> None:
    """Until no runner holds more than its fair share of loops (by who ran each last), or timeout."""
    share = -(-scenario.loops // scenario.runners)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last: dict[str, int] = {}
        for record in records.read_passes(run / "passes"):
            last[record.loop] = record.pid
        counts = [list(last.values()).count(r.pid) for r in cluster.live()]
        if counts and max(counts) <= share:
            return
        cluster.reap()
        time.sleep(0.2)


def run_scenario(scenario: Scenario, backend: Backend, workdir: Path, net: Net | None = None) -> Outcome:
    """Run one cell against an opened ``backend`` and check it (a cross-host fault on
    ``net``'s simulated hosts, one runner per host)."""
    fault = FAULTS[scenario.fault]
    outcome = Outcome(scenario)
    if backend.name not in fault.backends:
        outcome.skipped = "n/a"
        return outcome
    if fault.hosts and net is not None and len(net.hosts) < scenario.runners:
        outcome.skipped = f"{scenario.runners} runners, {len(net.hosts)} simulated hosts"
        return outcome
    net = net if fault.hosts else None
    tag = uuid.uuid4().hex[:10]
    run = workdir / f"{backend.name}-{scenario.fault}{'-' + scenario.plant if scenario.plant else ''}"
    shutil.rmtree(run, ignore_errors=True)
    for sub in ("passes", "logs", "ctl"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    store.create(run / "fenced.db")
    events = EventLog(run / "events.jsonl")
    proxy = Proxy(*backend.upstream) if backend.network and not fault.hosts else None

    def url_for(n: int) -> tuple[str, int | None]:
        if fault.hosts:
            return backend.host_url(run, tag), None
        port = proxy.listen() if proxy is not None else None
        return backend.url(run, tag, port), port

    cluster = Cluster(run, events, url_for, runner_env(run, scenario),
                      faketime=scenario.fault == "clock_jump", net=net)
    stage = Stage(run, cluster, backend, proxy, events, scenario.rng, scenario.ttl, tag,
                  [f"loop{n:02d}" for n in range(scenario.loops)], net)
    why = fault.unavailable(stage)
    if why is not None:
        outcome.skipped = why
        events.close()
        if proxy is not None:
            proxy.close()
        return outcome
    meta = {**asdict(scenario), "tag": tag, "wall_offset": wall_offset(),
            "url": backend.host_url(run, tag) if fault.hosts else backend.url(run, tag, 0)}
    if net is not None:
        net.heal()
        meta["hosts"] = [asdict(host) for host in net.hosts]
        meta["coordinator_address"] = net.coordinator_address
    (run / "meta.json").write_text(json.dumps(meta, indent=2))
    prepared = False
    try:
        fault.prepare(stage)
        prepared = True
        for _ in range(scenario.runners):
            cluster.start()
        wait_warm(cluster, run, scenario.loops, timeout=30 + 2 * scenario.loops * scenario.ttl)
        wait_spread(cluster, run, scenario, scenario.settle)
        events.phase("warm")
        outcome.injections = Nemesis(stage, fault).run(scenario.seconds)
        events.phase("teardown")
    finally:
        cluster.stop_all()
        if net is not None:
            net.heal()
            with contextlib.suppress(Exception):  # information only
                events.write("switch", **net.stats())
        if prepared:
            try:
                fault.restore(stage)
            except Exception as exc:
                outcome.notes.append(f"restore failed: {exc}")
        events.close()
        if proxy is not None:
            proxy.close()
        try:
            backend.cleanup(tag)
        except Exception as exc:  # a failed cleanup must not hide the result
            outcome.notes.append(f"cleanup failed: {exc}")
    outcome.run = run
    outcome.report = check(records.load(run))
    return outcome
