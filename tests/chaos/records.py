"""What a chaos run leaves behind, read back into plain records for the checker.

A run directory holds ``meta.json`` (the scenario), ``events.jsonl`` (what the
harness and the nemesis did, on CLOCK_MONOTONIC), ``passes/<pid>.log`` (what
the passes recorded, see ``workload``), ``fenced.db`` (the fenced store) and
``logs/runner-<n>.log`` (each runner's ``--log-format json`` output). Every time
here is in seconds on CLOCK_MONOTONIC, shared by all processes of the host; log
lines carry wall-clock times, which are mapped back with the offset the harness
measured (and, for a runner whose wall clock was made to jump, the jump).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.chaos.store import Write, read_writes


@dataclass(frozen=True)
class PassRecord:
    """One pass: ``end`` is None when its process died in it; ``paused_at`` when it stopped itself."""

    loop: str
    pid: int
    seq: int
    fence: int
    start: float
    end: float | None = None
    outcome: str | None = None
    paused_at: float | None = None


@dataclass(frozen=True)
class LogLine:
    """One JSON log line of a runner (``loop`` is the bare loop name)."""

    pid: int
    t: float
    level: str
    event: str | None = None
    loop: str | None = None
    fence: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Fault:
    """One injected fault, from ``start`` until it was undone at ``end``.

    ``target`` is the pid it was aimed at (None: the server or every runner).
    ``disruptive`` faults may legitimately move leases; the others must not.
    ``paused``: the target was stopped (SIGSTOP) from ``start`` to ``end``.
    ``aware``: from when the old holder could notice its loss (``end`` for a
    pause, ``start`` otherwise).
    """

    kind: str
    start: float
    end: float
    target: int | None = None
    disruptive: bool = True
    paused: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def aware(self) -> float:
        return self.end if self.paused else self.start


@dataclass(frozen=True)
class RunnerLife:
    """One runner process: ``sent`` is the last signal the harness sent it, if any."""

    n: int
    pid: int
    started: float
    exited: float | None = None
    code: int | None = None
    sent: str | None = None


@dataclass
class History:
    """Everything the checker looks at, for one run."""

    ttl: float
    loops: list[str]
    passes: list[PassRecord]
    writes: list[Write]
    logs: list[LogLine]
    faults: list[Fault]
    runners: list[RunnerLife]
    warm: float
    teardown: float
    unparsed_log_lines: int = 0

    @property
    def renew_every(self) -> float:
        return self.ttl / 3


def read_passes(folder: Path) -> list[PassRecord]:
    """Every pass in every ``<pid>.log`` under ``folder``, in start order."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for path in sorted(folder.glob("*.log")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 6 or parts[0] not in ("S", "P", "E"):
                continue  # a line cut short by kill -9
            kind, seq, loop, pid, fence = parts[0], int(parts[1]), parts[2], int(parts[3]), int(parts[4])
            entry = found.setdefault((pid, seq), {"loop": loop, "pid": pid, "seq": seq, "fence": fence})
            if kind == "S" or kind == "E":
                entry["start"] = int(parts[5]) / 1e9
            if kind == "P":
                entry["paused_at"] = int(parts[5]) / 1e9
            if kind == "E" and len(parts) == 8:
                entry["end"] = int(parts[6]) / 1e9
                entry["outcome"] = parts[7]
    records = [PassRecord(**entry) for entry in found.values() if "start" in entry]
    return sorted(records, key=lambda r: (r.start, r.pid))


def wall_to_monotonic(text: str, offset: float) -> float:
    """A log line's ``time`` (``2026-01-02T03:04:05.678Z``) on CLOCK_MONOTONIC."""
    stamp = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    return stamp - offset


def unjump(t: float, shifts: list[float], low: float, high: float) -> float:
    """Undo a wall-clock jump: the shift that puts ``t`` inside the run's span [low, high]."""
    for shift in sorted({0.0, *shifts}, key=abs):
        if low <= t - shift <= high:
            return t - shift
    return t


def read_logs(
    folder: Path, pids: dict[int, int], offset: float, shifts: dict[int, list[float]],
    span: tuple[float, float],
) -> tuple[list[LogLine], int]:
    """The JSON lines of ``runner-<n>.log`` files (``pids``: n -> pid), and how many were not JSON."""
    lines: list[LogLine] = []
    unparsed = 0
    for n, pid in pids.items():
        path = folder / f"runner-{n}.log"
        if not path.exists():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            try:
                item = json.loads(raw)
                t = wall_to_monotonic(item["time"], offset)
            except (ValueError, KeyError, TypeError):
                unparsed += bool(raw.strip())
                continue
            t = unjump(t, shifts.get(pid, []), span[0] - 5, span[1] + 60)
            loop = item.get("loop")
            lines.append(LogLine(
                pid=pid, t=t, level=str(item.get("level", "")), event=item.get("event"),
                loop=None if loop is None else str(loop).partition(":")[2] or str(loop),
                fence=item.get("fence"), message=str(item.get("message", "")),
            ))
    return sorted(lines, key=lambda line: line.t), unparsed


def load(run: Path) -> History:
    """Read a finished run directory."""
    meta = json.loads((run / "meta.json").read_text())
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line]
    runners: dict[int, dict[str, Any]] = {}
    faults: list[Fault] = []
    shifts: dict[int, list[float]] = {}
    warm = teardown = 0.0
    for event in events:
        kind = event.pop("kind")
        if kind == "runner_started":
            runners[event["pid"]] = {"n": event["n"], "pid": event["pid"], "started": event["t"]}
        elif kind == "runner_exited":
            runners[event["pid"]].update(exited=event["t"], code=event["code"])
        elif kind == "signal":
            runners[event["pid"]]["sent"] = event["sig"]
        elif kind == "fault":
            name = event.pop("fault")
            faults.append(Fault(kind=name, **event))
            if name == "clock_jump" and event["target"] is not None:
                shifts.setdefault(event["target"], []).append(event["detail"]["shift"])
        elif kind == "phase" and event["name"] == "warm":
            warm = event["t"]
        elif kind == "phase" and event["name"] == "teardown":
            teardown = event["t"]
    lives = [RunnerLife(**r) for r in sorted(runners.values(), key=lambda r: r["n"])]
    start = min((life.started for life in lives), default=warm)
    logs, unparsed = read_logs(
        run / "logs", {life.n: life.pid for life in lives}, meta["wall_offset"], shifts,
        (start, teardown),
    )
    return History(
        ttl=meta["ttl"],
        loops=[f"loop{n:02d}" for n in range(meta["loops"])],
        passes=read_passes(run / "passes"),
        writes=read_writes(run / "fenced.db"),
        logs=logs,
        faults=faults,
        runners=lives,
        warm=warm,
        teardown=teardown,
        unparsed_log_lines=unparsed,
    )
