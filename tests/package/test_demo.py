"""``make demo`` (examples/demo.py): what it prints is what the coordinator recorded, and it cleans up."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from ostinato.coordinators import from_url
from ostinato.errors import OstinatoError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.py"

KILL = re.compile(r"^\*\*\* kill -9 of runner (\S+), the holder of (.*?)(?:; not its loops: .*)? \*\*\*$")
CHANGE = re.compile(r"^  (\S+)\s+(\S+) fence (\d+) -> (\S+) fence (\d+)\s{3}(.+)$")


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ostinato_demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_claims_name_only_the_loops_the_killed_runner_held() -> None:
    """With one loop already moved to the other runner, neither the kill nor the fences are overstated."""
    demo = load_demo()
    held = demo.Held
    before = {"m:aggregate": held("h:2", 2), "m:publish": held("h:1", 1), "m:receive": held("h:1", 1)}
    after = {"m:aggregate": held("h:2", 2), "m:publish": held("h:2", 2), "m:receive": held("h:2", 2)}
    claim = demo.kill_claim(before, "h:1")
    assert claim == ("*** kill -9 of runner h:1, the holder of m:publish, m:receive; "
                     "not its loops: m:aggregate (h:2 fence 2) ***")
    assert demo.changes(before, after, "h:1") == [
        "  m:aggregate  h:2 fence 2 -> h:2 fence 2   unchanged: its holder was not killed",
        "  m:publish    h:1 fence 1 -> h:2 fence 2   taken over by h:2, fence went up",
        "  m:receive    h:1 fence 1 -> h:2 fence 2   taken over by h:2, fence went up",
    ]
    late = {**after, "m:receive": held(None, 1)}
    assert demo.changes(before, late, "h:1")[2].endswith("not taken over yet")
    assert not demo.taken_over(before, "h:1")(late)
    assert demo.taken_over(before, "h:1")(after)


@dataclass
class Run:
    """The demo in a subprocess, its output lines as they come, and a scratch ``TMPDIR`` of its own."""

    proc: subprocess.Popen[str]
    tmp: Path
    lines: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, tmp: Path, *, short: bool = True) -> Run:
        tmp.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSTINATO_")}
        env.update(TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, str(DEMO), *(["--short"] if short else [])],
                                env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        run = cls(proc, tmp)
        threading.Thread(target=run._read, daemon=True).start()
        return run

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
        self.ended.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, count: int = 1, timeout: float = 30.0) -> re.Match[str]:
        """The ``count``-th output line matching ``pattern``, waited for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.ended.is_set()
            matches = [m for line in list(self.lines) if (m := re.search(pattern, line))]
            if len(matches) >= count:
                return matches[count - 1]
            if ended or time.monotonic() > deadline:
                raise AssertionError(f"no line {count} matching {pattern!r}:\n{self.output()}")
            time.sleep(0.01)

    def runner_pids(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines
                # The runners write to the same output, so a line may begin with their text.
                if (m := re.search(r"started runner \S+:(\d+)$", line))]

    def kill(self) -> None:
        """Kill the demo if it still runs, and wait for the end of its output."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.ended.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_clean(run: Run) -> None:
    """No demo folder left in its TMPDIR, and none of the runners it started still alive."""
    assert list(run.tmp.iterdir()) == [], run.output()
    pids = run.runner_pids()
    assert pids, run.output()
    assert [pid for pid in pids if not gone(pid)] == []


async def watch(url: str, proc: subprocess.Popen[str]) -> dict[str, list[tuple[str | None, int]]]:
    """Every (holder, fence) each loop goes through in the coordinator, until the demo exits."""
    seen: dict[str, list[tuple[str | None, int]]] = {}
    coordinator = from_url(url)
    try:
        await coordinator.open()
        while proc.poll() is None:
            try:
                records = await coordinator.loops()
            except OstinatoError:  # the demo removed its folder on the way out
                break
            for record in records:
                states = seen.setdefault(record.key, [])
                if not states or states[-1] != (record.holder, record.fence):
                    states.append((record.holder, record.fence))
            await asyncio.sleep(0.005)
    finally:
        await coordinator.close()
    return seen


@pytest.mark.slow
def test_the_demo_says_what_the_coordinator_recorded_and_leaves_no_folder(tmp_path: Path) -> None:
    """Which loops the kill hit, and each loop's holder and fence before and after, match the
    coordinator as watched from outside; the scratch folder is gone at exit."""
    run = Run.start(tmp_path / "tmp")
    try:
        url = run.wait_line(r" on (sqlite:///\S+)$").group(1)
        database = Path(url.removeprefix("sqlite:///"))
        deadline = time.monotonic() + 30
        while not database.exists():  # made by the first runner, not by the watcher
            assert time.monotonic() < deadline, run.output()
            time.sleep(0.01)
        seen = asyncio.run(watch(url, run.proc))
        assert run.proc.wait(60) == 0, run.output()
    finally:
        run.kill()
    run.wait_line(r"^removed ")
    lines = run.lines
    started = [line.split()[-1] for line in lines if line.startswith("started runner ")]
    kills = [m for line in lines if (m := KILL.match(line))]
    assert len(kills) == 1, run.output()
    victim = kills[0].group(1)
    hit = set(kills[0].group(2).split(", ")) - {"no loop"}
    assert victim in started
    (survivor,) = set(started) - {victim}
    changes = {m.group(1): m for line in lines if (m := CHANGE.match(line))}
    assert set(changes) == set(seen) == {"metrics:aggregate", "metrics:publish", "metrics:receive"}

    for key, change in changes.items():
        was = (change.group(2), int(change.group(3)))
        now = (change.group(4), int(change.group(5)))
        states = seen[key]
        assert was in states, (key, states)
        assert now in states[states.index(was):], (key, states)
        assert (was[0] == victim) == (key in hit), run.output()
        if key in hit:
            assert now[0] == survivor
            assert now[1] > was[1]
            assert change.group(6) == f"taken over by {survivor}, fence went up"
        else:
            assert now == was
            assert change.group(6) == "unchanged: its holder was not killed"
        # The killed runner never shows up as the holder again.
        assert all(holder != victim for holder, _ in states[states.index(now):])
    # The last line of the story: no holder after the survivor's graceful stop, as recorded.
    assert any(line.endswith("after a graceful stop: no loop has a holder ===") for line in lines)
    assert all(states[-1][0] is None for states in seen.values()), seen
    assert_clean(run)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_demo_stops_its_runners_and_removes_its_folder(
    tmp_path: Path, signum: int, code: int,
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM while both runners run: they are stopped and the folder removed."""
    # Without --short the demo shows status for seconds before its kill: the signal comes
    # while both runners run, however fast the machine.
    run = Run.start(tmp_path / "tmp", short=False)
    try:
        folder = Path(run.wait_line(r" on sqlite:///(\S+)/ostinato\.db$").group(1))
        run.wait_line(r"started runner \S+:\d+$", count=2)
        assert folder.exists()
        run.proc.send_signal(signum)
        assert run.proc.wait(30) == code, run.output()
    finally:
        run.kill()
    run.wait_line(r"^removed ")
    assert not folder.exists()
    assert len(run.runner_pids()) == 2, run.output()
    assert_clean(run)
