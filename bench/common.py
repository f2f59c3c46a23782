"""What the benchmark scripts share: summaries and goals, machine facts, record files, /proc
readings, and the frame of a run (its scratch folder, signals, the report's end, the JSON file).

``bench/core.py``, ``coordinators.py``, ``isolation.py`` and ``peers.py`` import it
as ``common``: each puts this folder first on ``sys.path`` before it does. The
apps that runners and isolated children import (``apps.py``, ``isolation_apps.py``,
``peers_apps/``) do not, so that none of this is loaded into a timed process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import ostinato

BENCH = Path(__file__).resolve().parent

#: A goal: a comparison (">=" or "<") and its bound.
Goal = tuple[str, float]

_PR_SET_PDEATHSIG = 1

log = logging.getLogger("bench")


# -- figures -----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of an already sorted sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, max and min of ``values``, in any order."""
    ordered = sorted(values)
    return {"p50": percentile(ordered, 0.5), "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else None, "min": ordered[0] if ordered else None}


# -- goals and the report ---------------------------------------------------------------------


def meets(goal: Goal, value: float | None) -> bool:
    comparison, bound = goal
    if value is None:
        return False
    return value >= bound if comparison == ">=" else value < bound


def judge(checks: Iterable[tuple[str, str, float | None]], goals: Mapping[str, Goal],
          bound_format: str = "") -> list[dict[str, Any]]:
    """One entry per ``(figure, goal key, value)``: the goal as text and whether it was met.

    ``bound_format`` is the format spec of the bound in that text: ``"g"`` for
    coordinators.json (``2`` rather than ``2.0``), none for the others.
    """
    return [
        {"figure": figure, "goal": f"{goals[key][0]} {goals[key][1]:{bound_format}}", "key": key,
         "value": value, "met": meets(goals[key], value)}
        for figure, key, value in checks
    ]


def in_us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def in_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def report_end(result: Mapping[str, Any], results: Path) -> list[str]:
    """The last lines of every table: the problems, if any, the duration and the JSON file."""
    lines: list[str] = []
    if result["problems"]:
        lines += ["", "problems:"] + [f"  {p}" for p in result["problems"]]
    lines += ["", f"total {result['duration_s']:.0f} s; JSON: {results}"]
    return lines


# -- machine facts -----------------------------------------------------------------------------


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def git(*args: str) -> str | None:
    """What ``git args`` prints in the project's root, less its last newline; None if git fails."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=BENCH.parent, capture_output=True, text=True, timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.rstrip("\n")


def base_machine_facts(*, trim_status: bool = True) -> dict[str, Any]:
    """The machine, the Python and the library the figures were taken on; each script adds its own.

    With ``trim_status``, the ``git status --porcelain`` output loses its leading
    blanks before it is split into ``src_modified_files``, so the first line of an
    unstaged change reads ``M file`` and the next ones `` M file`` (as in core.json,
    coordinators.json and peers.json); without it every line stays as git prints it
    (as in isolation.json).
    """
    dirty = git("status", "--porcelain", "--", "src")
    if dirty and trim_status:
        dirty = dirty.strip()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "ostinato": ostinato.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "src_modified_files": dirty.splitlines() if dirty else [],
        "loadavg_at_start": list(os.getloadavg()),
    }


# -- record files ------------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path gives the four slashes


def file_size(path: Path) -> int:
    """The size of ``path``; 0 while it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_structs(path: Path, record: struct.Struct) -> list[tuple[Any, ...]]:
    """The complete records in ``path`` (a killed writer may leave half of one); none if it is missing."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    usable = len(raw) // record.size * record.size
    return list(record.iter_unpack(raw[:usable]))


def int64_columns(raw: bytes, width: int) -> tuple[array[int], ...]:
    """The ``width`` columns of the complete records of little-endian int64 fields in ``raw``."""
    size = 8 * width
    values = array("q")
    values.frombytes(raw[: len(raw) // size * size])
    if sys.byteorder != "little":
        values.byteswap()
    return tuple(values[column::width] for column in range(width))


# -- processes ---------------------------------------------------------------------------------


def death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child die with the benchmark (Linux only)."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return arm


def logged_problems(logs: Iterable[Path], markers: Sequence[str], width: int | None = None) -> list[str]:
    """The lines of these log files that hold one of ``markers``, stripped, cut to ``width``
    characters, each after its file's name; the files in name order."""
    found = []
    for path in sorted(logs):
        for line in path.read_text(errors="replace").splitlines():
            if any(marker in line for marker in markers):
                found.append(f"{path.name}: {line.strip()[:width]}")
    return found


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: state, ppid, ... (``fields[0]``
    is field 3 of proc(5))."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


# -- the frame of a run ------------------------------------------------------------------------


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def shm_folder(stack: contextlib.ExitStack, tmp: Path, prefix: str,
               logger: logging.Logger = log) -> Path:
    """A fresh folder for record files under /dev/shm (else under ``tmp``), removed by ``stack``."""
    base = Path("/dev/shm")
    if not base.is_dir():
        logger.warning("no /dev/shm here: record files go to %s", tmp)
        base = tmp
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    return folder


def finish(result: dict[str, Any], began: float, goals: list[dict[str, Any]] | None = None) -> None:
    """Add the last figures of a result: ``goals`` (if given) and whether all were met, then the
    load average at the end and the duration since ``began``."""
    if goals is not None:
        result["goals"] = goals
        result["all_goals_met"] = all(g["met"] for g in goals)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["duration_s"] = time.monotonic() - began


def raise_exit(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def set_up_process() -> None:
    """Log INFO and up to stderr; end on SIGTERM and SIGHUP through ``SystemExit``, so that every
    cleanup of the run (runners killed, folders removed) still happens."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGTERM, raise_exit)
    signal.signal(signal.SIGHUP, raise_exit)


def write_json(path: Path, result: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
