"""Pure checks over a run's history: what went wrong, and how fast things recovered.

``check(history)`` returns a ``Report``. Its verdict (``Report.ok``) needs:

* ``stale_accepted == 0``: no fenced write accepted with a fence below the
  highest the store had seen for that loop (recomputed from the store's own log);
* ``fence_violations == 0``: no fence granted twice, no fence shared by two
  processes, and in start order no pass with a fence below an earlier pass's;
* ``overlaps == 0``: no two passes of a loop with different fences running at the
  same time, except an old holder's pass that was paused (SIGSTOP) for at least
  the TTL inside it and ended within one renewal interval (TTL/3) of continuing
  (those are counted as ``allowed_overlaps``);
* ``spurious_failovers == 0``: no loop moved to another runner, without its holder
  releasing it, while no disruptive fault was active (nor within 2 TTL + 1 s
  after one) and the holder was alive;
* ``silent_stops == 0``: every stretch longer than 1.5 TTL + 0.25 s without a pass
  of a loop ending has a warning or error about that loop (or a runner-wide
  error) logged in it;
* ``not_resumed == 0`` and ``never_ran == 0``: every loop ran, and resumed after
  every fault that took it from its holder;
* ``bad_exits == 0``: a SIGTERMed runner exits 0, and no runner dies unasked.

It also measures ``failover_s`` (fault to the first pass of the loop under a new
holder), ``detection_s`` (from when an old holder could notice, to the end of its
last pass under the lost fence), ``max_gap`` (the longest stretch without a
pass ending, per loop, up to the teardown) and, for each loop a fault moved to
another runner, ``handover_margins``: the new holder's first pass start minus
the old holder's last pass end under the old fence (negative: they overlapped;
``stopped_first`` counts those at or above zero).
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from tests.chaos.records import Fault, History, LogLine, PassRecord
from tests.chaos.store import Write

#: Faults aimed at one runner that take its loops away from it.
TAKES_LOOPS = ("kill9", "stop_long", "pause_write", "sigterm", "blackhole", "partition",
               "requests_lost", "host_kill9", "host_crash", "host_sigstop", "cut_terminate",
               "cut_keepalive")
#: Faults after which the old holder lives on and must notice it lost its loops.
LEAVES_HOLDER = ("stop_long", "pause_write", "blackhole", "server_restart", "conn_kill",
                 "partition", "replies_lost", "requests_lost", "latency06", "latency12", "flap",
                 "host_sigstop", "cut_terminate", "cut_keepalive", "clock_step")
#: A pause shorter than this fraction of the TTL does not excuse an overlap.
PAUSE_SLACK = 0.95
LOUD = ("warning", "error", "critical")
#: How many problems of each kind a report keeps, for reading.
PROBLEMS_PER_KIND = 8
#: A stretch of this many TTLs (+ 0.25 s) without a pass ending must have been logged.
SILENT_AFTER = 1.5


@dataclass
class Report:
    """What one run did, and whether it kept the guarantees (``ok``)."""

    passes: int = 0
    failed_passes: int = 0
    writes: int = 0
    stale_accepted: int = 0
    stale_refused: int = 0
    superseded_accepted: int = 0
    store_errors: int = 0
    fence_violations: int = 0
    overlaps: int = 0
    allowed_overlaps: int = 0
    handovers: int = 0
    spurious_failovers: int = 0
    failover_s: list[float] = field(default_factory=list)
    detection_s: list[float] = field(default_factory=list)
    #: Per loop a fault moved to another runner: new holder's first pass start minus the old
    #: holder's last pass end under the old fence (negative: an overlap).
    handover_margins: list[float] = field(default_factory=list)
    max_gap: float = 0.0
    max_gap_loop: str | None = None
    silent_stops: int = 0
    not_resumed: int = 0
    never_ran: int = 0
    bad_exits: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.stale_accepted or self.store_errors or self.fence_violations or self.overlaps
            or self.spurious_failovers or self.silent_stops or self.not_resumed or self.never_ran
            or self.bad_exits
        )

    def failover(self, pct: float) -> float | None:
        return percentile(self.failover_s, pct)

    def detection(self, pct: float) -> float | None:
        return percentile(self.detection_s, pct)

    @property
    def stopped_first(self) -> int:
        """Moves where the old holder's last pass ended before the new holder's first began."""
        return sum(margin >= 0 for margin in self.handover_margins)

    @property
    def margin_min(self) -> float | None:
        return min(self.handover_margins, default=None)

    def margin(self, pct: float) -> float | None:
        return percentile(self.handover_margins, pct)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(ok=self.ok, failover_p50=self.failover(50), failover_p99=self.failover(99),
                   detection_p50=self.detection(50), detection_p99=self.detection(99),
                   moved=len(self.handover_margins), stopped_first=self.stopped_first,
                   margin_min=self.margin_min, margin_p50=self.margin(50))
        return out

    def problem(self, text: str) -> None:
        """Keep the first few problems of each kind (the words before the colon)."""
        kind = text.partition(":")[0]
        if sum(p.partition(":")[0] == kind for p in self.problems) < PROBLEMS_PER_KIND:
            self.problems.append(text)


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def by_loop(passes: Iterable[PassRecord]) -> dict[str, list[PassRecord]]:
    """Passes grouped by loop, each group in start order."""
    groups: dict[str, list[PassRecord]] = defaultdict(list)
    for record in passes:
        groups[record.loop].append(record)
    for group in groups.values():
        group.sort(key=lambda r: (r.start, r.pid))
    return groups


def deaths(history: History) -> dict[int, float]:
    """When each runner process ended (an unfinished pass ends there too)."""
    return {life.pid: life.exited for life in history.runners if life.exited is not None}


def pass_end(record: PassRecord, died: dict[int, float]) -> float:
    if record.end is not None:
        return record.end
    return died.get(record.pid, math.inf)


@dataclass(frozen=True)
class Stop:
    """A process stopped (SIGSTOP) from some moment in [``start``, ``seen``] to ``end``.

    ``start`` is when the signal was sent, or, for a process that stops itself, the
    moment it recorded before doing so; ``seen`` is when the nemesis saw every
    thread stopped. A thread may start a pass in between, and the stop freezes it.
    """

    start: float
    seen: float
    end: float


def pauses(history: History) -> dict[int, list[Stop]]:
    """When each process was stopped, from the faults and the passes' own records."""
    found: dict[int, list[Stop]] = defaultdict(list)
    self_stops: dict[int, list[float]] = defaultdict(list)
    for record in history.passes:
        if record.paused_at is not None:
            self_stops[record.pid].append(record.paused_at)
    for fault in history.faults:
        if fault.paused and fault.target is not None:
            start, seen = fault.start, float(fault.detail.get("seen", fault.start))
            if fault.kind == "pause_write":
                own = [t for t in self_stops.get(fault.target, []) if t <= fault.start]
                if own:
                    start = max(own)  # this fault's own record: the latest before it was seen
            found[fault.target].append(Stop(start, max(seen, start), fault.end))
    return found


def check_writes(writes: list[Write], passes: dict[str, list[PassRecord]], report: Report) -> None:
    """Stale writes, from the store's log alone; and writes let in before a newer holder wrote."""
    highest: dict[str, int] = {}
    newest: dict[str, tuple[list[float], list[int]]] = {}
    for loop, group in passes.items():
        best, starts, fences = -1, [], []
        for record in group:
            best = max(best, record.fence)
            starts.append(record.start)
            fences.append(best)
        newest[loop] = (starts, fences)
    for write in writes:
        report.writes += 1
        top = highest.get(write.loop)
        if top is not None and write.fence < top:
            if write.accepted:
                report.stale_accepted += 1
                report.problem(f"stale write accepted: {write.loop} fence {write.fence} < {top} "
                               f"(pid {write.pid}, t={write.t:.3f})")
            else:
                report.stale_refused += 1
        elif not write.accepted:
            report.store_errors += 1
            report.problem(f"store refused a current fence: {write.loop} fence {write.fence}")
        if write.accepted:
            highest[write.loop] = max(top if top is not None else write.fence, write.fence)
            starts, fences = newest.get(write.loop, ([], []))
            i = bisect.bisect_left(starts, write.t) - 1
            if i >= 0 and fences[i] > write.fence:
                report.superseded_accepted += 1


def check_fences(passes: dict[str, list[PassRecord]], logs: list[LogLine], report: Report) -> None:
    for loop, group in passes.items():
        owners: dict[int, set[int]] = defaultdict(set)
        best = -1
        for record in group:
            owners[record.fence].add(record.pid)
            if record.fence < best:
                report.fence_violations += 1
                report.problem(f"fence went back: {loop} pass of pid {record.pid} with fence "
                               f"{record.fence} started at {record.start:.3f} after fence {best}")
            best = max(best, record.fence)
        for fence, pids in owners.items():
            if len(pids) > 1:
                report.fence_violations += 1
                report.problem(f"fence shared: {loop} fence {fence} used by pids {sorted(pids)}")
    grants: dict[tuple[str | None, int | None], int] = defaultdict(int)
    for line in logs:
        if line.event == "lease_acquired":
            grants[line.loop, line.fence] += 1
    for (granted, granted_fence), count in grants.items():
        if count > 1:
            report.fence_violations += 1
            report.problem(f"fence granted {count} times: {granted} fence {granted_fence}")


def excused(old: PassRecord, new: PassRecord, old_end: float, stops: list[Stop], ttl: float) -> bool:
    """An overlap is allowed only after a pause of at least the TTL inside the old pass,
    ending within one renewal interval of the continue."""
    for stop in stops:
        if (stop.end - stop.seen >= PAUSE_SLACK * ttl and old.start <= stop.seen
                and stop.start <= old_end and new.start >= stop.start
                and old_end <= stop.end + ttl / 3):
            return True
    return False


def check_overlaps(history: History, passes: dict[str, list[PassRecord]], report: Report) -> None:
    """Overlapping pairs that are not excused; ``allowed_overlaps`` counts the excused old passes."""
    died, stopped = deaths(history), pauses(history)
    excused_passes: set[tuple[int, int]] = set()
    for loop, group in passes.items():
        for i, first in enumerate(group):
            first_end = pass_end(first, died)
            for second in group[i + 1:]:
                if second.start >= first_end:
                    break
                if first.fence == second.fence and first.pid == second.pid:
                    continue
                old, new = (first, second) if first.fence <= second.fence else (second, first)
                old_end = pass_end(old, died)
                if old.fence != new.fence and excused(old, new, old_end, stopped.get(old.pid, []),
                                                      history.ttl):
                    excused_passes.add((old.pid, old.seq))
                    continue
                report.overlaps += 1
                report.problem(
                    f"overlap: {loop} pid {old.pid} fence {old.fence} [{old.start:.3f}, "
                    f"{old_end:.3f}] with pid {new.pid} fence {new.fence} from {new.start:.3f}"
                )
    report.allowed_overlaps = len(excused_passes)


def disrupted(faults: list[Fault], t: float, ttl: float) -> bool:
    """Whether a disruptive fault was active at ``t``, or just over."""
    return any(f.disruptive and f.start - 0.1 <= t <= f.end + 2 * ttl + 1.0 for f in faults)


def check_handovers(history: History, passes: dict[str, list[PassRecord]], report: Report) -> None:
    released = {(line.loop, line.fence) for line in history.logs if line.event == "lease_released"}
    died = deaths(history)
    for loop, group in passes.items():
        holder: PassRecord | None = None
        for record in group:
            if record.start >= history.teardown:
                break
            if holder is not None and record.fence > holder.fence and record.pid != holder.pid:
                report.handovers += 1
                if not (
                    (loop, holder.fence) in released
                    or disrupted(history.faults, record.start, history.ttl)
                    or died.get(holder.pid, math.inf) <= record.start
                ):
                    report.spurious_failovers += 1
                    report.problem(
                        f"spurious failover: {loop} from pid {holder.pid} (fence {holder.fence}) "
                        f"to pid {record.pid} (fence {record.fence}) at {record.start:.3f}"
                    )
            if holder is None or record.fence >= holder.fence:
                holder = record


def explained(loop: str, start: float, end: float, logs: list[LogLine], ttl: float) -> bool:
    return any(
        start - ttl <= line.t <= end and line.level in LOUD
        and (line.loop == loop or (line.loop is None and line.level != "warning"))
        for line in logs
    )


def check_gaps(history: History, passes: dict[str, list[PassRecord]], report: Report) -> None:
    limit = SILENT_AFTER * history.ttl + 0.25
    for loop in history.loops:
        ends = sorted(r.end for r in passes.get(loop, []) if r.end is not None
                      and r.end < history.teardown)
        if not ends:
            report.never_ran += 1
            report.problem(f"never ran: {loop}")
            continue
        for start, end in zip(ends, [*ends[1:], history.teardown], strict=True):
            gap = end - start
            if gap > report.max_gap:
                report.max_gap, report.max_gap_loop = gap, loop
            if gap > limit and not explained(loop, start, end, history.logs, history.ttl):
                report.silent_stops += 1
                report.problem(f"silent stop: {loop} had no pass end for {gap:.2f}s from "
                               f"{start:.3f}, and nothing was logged about it")


def holder_at(group: list[PassRecord], t: float) -> PassRecord | None:
    """The last pass of a loop started before ``t``."""
    i = bisect.bisect_right([r.start for r in group], t) - 1
    return group[i] if i >= 0 else None


def check_recovery(history: History, passes: dict[str, list[PassRecord]], report: Report) -> None:
    """failover_s, detection_s, handover_margins and not_resumed, per fault and per loop it took.

    A fault aimed at a holder must see its loops resumed elsewhere. A fault on
    the server or on every runner is counted for the loops whose fence changed
    within 2 TTL + 1 s of its end; the others kept their leases through it.
    """
    died = deaths(history)
    for fault in history.faults:
        if not fault.disruptive:
            continue
        for loop, group in passes.items():
            before = holder_at(group, fault.start)
            if before is None or (fault.target is not None and before.pid != fault.target):
                continue
            after = [r for r in group if r.start >= fault.start and r.start < history.teardown]
            if fault.target is not None and fault.kind in TAKES_LOOPS:
                moved = next((r for r in after if r.pid != fault.target or r.fence > before.fence),
                             None)
                if moved is None:
                    report.not_resumed += 1
                    report.problem(f"not resumed: {loop} after {fault.kind} at {fault.start:.3f}")
                    continue
            else:
                moved = next((r for r in after if r.fence > before.fence), None)
                if moved is None or moved.start > fault.end + 2 * history.ttl + 1.0:
                    continue  # the holder kept its lease through the fault
            report.failover_s.append(moved.start - fault.start)
            last = max((pass_end(r, died) for r in group
                        if r.pid == before.pid and r.fence == before.fence), default=None)
            if last is None or last == math.inf:
                continue
            if moved.pid != before.pid:
                report.handover_margins.append(moved.start - last)
            if fault.kind in LEAVES_HOLDER:
                report.detection_s.append(max(0.0, last - fault.aware))


def check_exits(history: History, report: Report) -> None:
    for life in history.runners:
        if life.code is None:
            continue
        if life.sent == "KILL" and life.code == -9:
            continue
        if life.code != 0:
            report.bad_exits += 1
            why = f"after SIG{life.sent}" if life.sent else "unasked"
            report.problem(f"runner {life.n} (pid {life.pid}) exited {life.code} {why}")


def check(history: History) -> Report:
    """Every check over one run's history."""
    report = Report()
    passes = by_loop(history.passes)
    report.passes = sum(1 for r in history.passes if r.end is not None)
    report.failed_passes = sum(1 for r in history.passes if r.outcome == "raised")
    check_writes(history.writes, passes, report)
    check_fences(passes, history.logs, report)
    check_overlaps(history, passes, report)
    check_handovers(history, passes, report)
    check_gaps(history, passes, report)
    check_recovery(history, passes, report)
    check_exits(history, report)
    return report
