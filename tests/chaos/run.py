"""Run the fault matrix and print one table: fault x coordinator.

    python -m tests.chaos.run [--coordinator sqlite|redis|postgres|all] [--seconds N]
                              [--seed S] [--faults kill9,stop_long,...|local|cross-host]
                              [--cross-host]

Each cell starts 3 to 5 runners of ``tests/chaos/workload.py`` with 10 to 50
loops (drawn from the seed unless given), injects one kind of fault for
``--seconds`` as often as it fits, and checks the history. The cross-host
faults (``--faults cross-host``, or ``--cross-host`` for only those; ``all``
includes them) run 3 runners, each on a simulated host of its own
(``netsim``: network namespaces and a userspace switch, root only), against
Redis and PostgreSQL. The results of each coordinator go to
``tests/chaos/results/<coordinator>.json`` (a part of the matrix to
``<coordinator>-cross-host.json``, ``-local`` or ``-partial``). The exit status
is 1 when any cell broke a guarantee.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.backends import BACKENDS, Backend, Unavailable
from tests.chaos.harness import Outcome, Scenario, run_scenario
from tests.chaos.nemesis import CROSS_HOST, FAULTS
from tests.chaos.netsim import Net, NetUnavailable

RESULTS = Path(__file__).with_name("results")
COLUMNS = ("fault", "coordinator", "runners", "loops", "passes", "overlaps", "allowed",
           "stale_acc", "refused", "max_gap", "failover_p50", "failover_p99", "detect_p99",
           "spurious", "silent", "stopped_first", "margin_min", "margin_p50", "verdict")
#: Runners (each on a simulated host of its own) in a cross-host cell.
HOST_RUNNERS = 3
GROUPS = {"all": list(FAULTS), "cross-host": CROSS_HOST,
          "local": [name for name in FAULTS if name not in CROSS_HOST]}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def margin(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}s"


def row(outcome: Outcome) -> list[str]:
    s, report = outcome.scenario, outcome.report
    head = [s.fault, s.coordinator]
    if report is None:
        why = outcome.skipped or ""
        return [*head, *["-"] * (len(COLUMNS) - 3), why if why == "n/a" else f"skipped: {why}"]
    return [
        *head, str(s.runners), str(s.loops), str(report.passes), str(report.overlaps),
        str(report.allowed_overlaps), str(report.stale_accepted), str(report.stale_refused),
        seconds(report.max_gap), seconds(report.failover(50)), seconds(report.failover(99)),
        seconds(report.detection(99)), str(report.spurious_failovers), str(report.silent_stops),
        f"{report.stopped_first}/{len(report.handover_margins)}" if report.handover_margins else "-",
        margin(report.margin_min), margin(report.margin(50)), "ok" if report.ok else "FAIL",
    ]


def table(outcomes: list[Outcome]) -> str:
    """One line per cell, grouped by fault, in a fixed-width table."""
    faults = {name: n for n, name in enumerate(FAULTS)}
    backends = {name: n for n, name in enumerate(BACKENDS)}
    rows = [row(o) for o in sorted(outcomes, key=lambda o: (faults[o.scenario.fault],
                                                             backends[o.scenario.coordinator]))]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if i < len(COLUMNS) - 1 else len(c)
              for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", choices=[*BACKENDS, "all"], default="all")
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="how long the nemesis works on each cell (default 15)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", default="all",
                        help=f"comma-separated, of: {', '.join(FAULTS)}; or a group: {', '.join(GROUPS)}")
    parser.add_argument("--cross-host", action="store_true",
                        help="only the cross-host faults (the same as --faults cross-host)")
    parser.add_argument("--runners", type=int, default=None, help="default: 3 to 5, from the seed")
    parser.add_argument("--loops", type=int, default=None, help="default: 10 to 50, from the seed")
    parser.add_argument("--ttl", type=float, default=1.0, help="lease TTL in seconds (default 1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where run directories go (default: a temporary folder, kept on failure)")
    parser.add_argument("--no-save", action="store_true", help="do not write tests/chaos/results")
    args = parser.parse_args(argv)
    faults: list[str] = []
    for name in ("cross-host" if args.cross_host else args.faults).split(","):
        faults += [f for f in GROUPS.get(name, [name]) if f not in faults]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    args.fault_list = faults
    return args


def open_net(args: argparse.Namespace, coordinators: list[str]) -> tuple[Net | None, str | None]:
    """The simulated hosts, when a cross-host cell is to run: (net, None) or (None, why not)."""
    if not any(FAULTS[f].hosts and c in FAULTS[f].backends for f in args.fault_list
               for c in coordinators):
        return None, None
    net = Net(max(HOST_RUNNERS, args.runners or 0))
    try:
        net.open()
    except NetUnavailable as exc:
        print(f"*** SKIPPING the cross-host cells: {exc} ***", flush=True)
        return None, str(exc)
    return net, None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    coordinators = list(BACKENDS) if args.coordinator == "all" else [args.coordinator]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ostinato-chaos-"))
    print(f"chaos: seed {args.seed}, {args.seconds:g}s per cell, TTL {args.ttl:g}s, runs in {workdir}",
          flush=True)
    outcomes: list[Outcome] = []
    net, no_net = open_net(args, coordinators)
    try:
        for name in coordinators:
            outcomes += run_column(name, args, workdir, net, no_net)
    finally:
        if net is not None:
            net.close()
    print()
    print(table(outcomes))
    failed = [o for o in outcomes if o.report is not None and not o.report.ok]
    for outcome in failed:
        print(f"\n{outcome.scenario.fault} x {outcome.scenario.coordinator} (run: {outcome.run}):")
        for problem in outcome.report.problems[:10] if outcome.report else []:
            print(f"  {problem}")
    if not failed and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def run_column(name: str, args: argparse.Namespace, workdir: Path, net: Net | None,
               no_net: str | None) -> list[Outcome]:
    """Every cell of one coordinator; its results saved unless ``--no-save``."""
    backend = BACKENDS[name]()
    if net is not None:
        backend.serve_hosts(net.coordinator_address)
    began = time.monotonic()
    try:
        backend.open()
    except Unavailable as exc:
        print(f"*** SKIPPING {name}: {exc} ***", flush=True)
        cells = [Outcome(Scenario(name, f, args.seed, args.seconds), skipped=str(exc))
                 for f in args.fault_list]
    else:
        try:
            cells = []
            for fault in args.fault_list:
                if FAULTS[fault].hosts and net is None and name in FAULTS[fault].backends:
                    cells.append(Outcome(Scenario(name, fault, args.seed, args.seconds),
                                         skipped=no_net or "no simulated hosts"))
                    continue
                cells.append(run_cell(name, fault, args, backend, workdir, net))
        finally:
            backend.close()
    if not args.no_save and any(cell.skipped != "n/a" for cell in cells):
        save(name, args, cells, time.monotonic() - began)
    return cells


def run_cell(coordinator: str, fault: str, args: argparse.Namespace, backend: Backend,
             workdir: Path, net: Net | None = None) -> Outcome:
    rng = random.Random(f"{args.seed}:{coordinator}:{fault}:size")
    runners = rng.randint(3, 5)
    scenario = Scenario(
        coordinator, fault, args.seed, args.seconds,
        runners=args.runners or (HOST_RUNNERS if FAULTS[fault].hosts else runners),
        loops=args.loops or rng.choice([10, 20, 30, 50]),
        ttl=args.ttl, settle=10.0,
    )
    began = time.monotonic()
    try:
        outcome = run_scenario(scenario, backend, workdir, net)
    except Exception as exc:  # one broken cell must not hide the others
        outcome = Outcome(scenario, skipped=f"error: {exc!r}")
    took = time.monotonic() - began
    verdict = (outcome.skipped or "") if outcome.report is None else (
        "ok" if outcome.report.ok else "FAIL")
    if verdict == "n/a":
        return outcome
    report = outcome.report
    counts = "" if report is None else (
        f"  (stale {report.stale_accepted}, overlaps {report.overlaps}, spurious "
        f"{report.spurious_failovers}, silent {report.silent_stops})")
    print(f"  {coordinator:8} {fault:14} {took:5.1f}s  {verdict}{counts}", flush=True)
    return outcome


def save(coordinator: str, args: argparse.Namespace, cells: list[Outcome], took: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = {
        "coordinator": coordinator,
        "seed": args.seed,
        "seconds_per_cell": args.seconds,
        "ttl": args.ttl,
        "took_s": round(took, 1),
        "command": f"python -m tests.chaos.run --coordinator {coordinator} --seed {args.seed} "
                   f"--seconds {args.seconds:g}" + faults_flag(args.fault_list),
        "cells": {cell.scenario.fault: cell.to_dict() for cell in cells},
    }
    (RESULTS / f"{coordinator}{results_suffix(args.fault_list)}.json").write_text(
        json.dumps(data, indent=2) + "\n")


def faults_flag(faults: list[str]) -> str:
    """``--faults`` as a command line would give it: a group's name, or the list."""
    group = next((name for name, members in GROUPS.items() if faults == members), None)
    if group == "all":
        return ""
    return f" --faults {group or ','.join(faults)}"


def results_suffix(faults: list[str]) -> str:
    """Where a run's results go: ``<coordinator>.json`` for every fault, so that a part of
    the matrix never overwrites the whole; ``-cross-host``, ``-local`` or ``-partial`` otherwise."""
    for group, members in GROUPS.items():
        if faults == members:
            return "" if group == "all" else f"-{group}"
    return "-partial"


if __name__ == "__main__":
    sys.exit(main())
