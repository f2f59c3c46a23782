"""Hung, crashing and leaking passes in a real runner process: the loops keep going."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.history import PassRecord, overlaps

pytestmark = pytest.mark.slow
APP = Path(__file__).with_name("isoapp.py")


@dataclass
class Run:
    proc: subprocess.Popen[str]
    records: Path
    url: str
    env: dict[str, str]

    def passes(self, loop: str) -> list[PassRecord]:
        path = self.records / f"{loop}.log"
        found: dict[tuple[int, int], PassRecord] = {}
        if not path.exists():
            return []
        for line in path.read_text().splitlines():
            _, pid, fence, start, end = line.split()
            key = (int(pid), int(start))
            if end != "-" or key not in found:
                found[key] = PassRecord(int(pid), int(fence), int(start) / 1e9,
                                        None if end == "-" else int(end) / 1e9)
        return sorted(found.values(), key=lambda r: r.start)

    def wait(self, condition, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def status(self) -> dict[str, dict[str, object]]:
        out = subprocess.run([sys.executable, "-m", "ostinato", "status", "--json",
                              "--coordinator", self.url], capture_output=True, text=True,
                             env=self.env, check=True)
        return {row["loop"]: row for row in json.loads(out.stdout)["loops"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One runner of ``isoapp`` for the module: each test watches loops of its own."""
    tmp_path = tmp_path_factory.mktemp("iso")
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "OSTINATO_TEST_RECORDS": str(records),
           "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    url = f"sqlite:///{tmp_path / 'iso.db'}"
    log = (tmp_path / "runner.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ostinato", "run", f"{APP}:app",
                             "--coordinator", url], env=env, stdout=log, stderr=log, text=True)
    try:
        yield Run(proc, records, url, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def log_text(run: Run) -> str:
    return Path(run.records.parent / "runner.log").read_text()


def test_hung_passes_in_each_mode(run: Run) -> None:
    """Past timeout=1s: the thread pass is reported and keeps its lease, async and process passes end."""
    run.wait(lambda: len(run.passes("hang_async")) >= 3, what="three async passes")
    run.wait(lambda: len(run.passes("hang_process")) >= 3, what="three isolated passes")
    # The isolated ones each ran in a new child: the hung one was killed.
    pids = [r.pid for r in run.passes("hang_process")]
    assert len(set(pids)) == len(pids)
    assert all(r.pid != run.proc.pid for r in run.passes("hang_process"))
    assert all(r.pid == run.proc.pid for r in run.passes("hang_async"))
    for loop in ("hang_async", "hang_process"):
        starts = [r.start for r in run.passes(loop)]
        assert min(b - a for a, b in itertools.pairwise(starts)) >= 1.0  # each ran its second
    # The thread pass cannot be stopped: one pass only, reported, lease (2s TTL) kept by renewals.
    run.wait(lambda: log_text(run).count("hang_thread: pass has run for") >= 2, what="overrun alerts")
    [stuck] = run.passes("hang_thread")
    rows = run.status()
    assert rows["hang_thread"]["holder"] is not None
    assert rows["hang_thread"]["fence"] == stuck.fence
    assert time.monotonic() - stuck.start > 2.0
    run.wait(lambda: (run.status()["hang_process"]["errors"] or 0) >= 2, what="errors reported")
    assert "timeout" in str(run.status()["hang_process"]["last_error"])


def test_a_segfaulting_child_is_a_failed_pass_not_a_dead_loop(run: Run) -> None:
    """SIGSEGV in an isolated pass is counted as an error and the next pass runs in a new child."""
    run.wait(lambda: len(run.passes("segfault")) >= 8, what="passes through several crashes")
    records = run.passes("segfault")
    crashed = [r for r in records if r.end is None]
    finished = [r for r in records if r.end is not None]
    assert len(crashed) >= 3
    assert len(finished) >= 3
    assert all(any(f.start > c.start for f in finished) for c in crashed[:-1])
    assert overlaps(records, unfinished_end={r.pid: r.start + 0.001 for r in crashed}) == []
    run.wait(lambda: (run.status()["segfault"]["errors"] or 0) >= 2, what="errors reported")
    assert "SIGSEGV" in str(run.status()["segfault"]["last_error"])


def test_leaking_and_worn_children_are_recycled(run: Run) -> None:
    """max_memory and max_passes replace the child between passes, with a log line."""
    run.wait(lambda: len({r.pid for r in run.passes("leak")}) >= 3, what="leak recycled twice")
    run.wait(lambda: len(run.passes("recycled")) >= 10, what="ten recycled passes")
    leak = run.passes("leak")
    per_child = [sum(r.pid == pid for r in leak if r.end is not None) for pid in
                 dict.fromkeys(r.pid for r in leak)]
    assert all(n <= 3 for n in per_child[:-1])  # 50 MB a pass under a 120 MB bound
    recycled = run.passes("recycled")[:9]
    assert [r.pid for r in recycled[::3]] == list(dict.fromkeys(r.pid for r in recycled))
    assert all(r.end is not None for r in leak[:-1] + recycled)  # the last may still run
    assert "recycling the worker process because it uses" in log_text(run)
    assert "recycling the worker process because it ran 3 passes" in log_text(run)
