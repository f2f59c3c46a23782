"""Start real ``ostinato run`` processes and read back what their passes recorded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ostinato.coordinators import from_url
from tests.history import PassRecord
from tests.servers import postgres_url, redis_url

WORKLOAD = Path(__file__).with_name("workload.py")
OSTINATO = [sys.executable, "-m", "ostinato"]


@dataclass
class Cluster:
    """Runner processes of the workload app sharing one coordinator."""

    url: str
    records: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed_at: dict[int, float] = field(default_factory=dict)

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        # Output goes to a file, so a failing test can show what every runner said,
        # the ones still running included.
        with self._output(len(self.procs)).open("wb") as out:
            proc = subprocess.Popen(
                [*OSTINATO, "run", f"{WORKLOAD}:app", "--coordinator", self.url, *extra],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def _output(self, index: int) -> Path:
        return self.records.with_name(f"{self.records.name}-runner{index}.out")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*OSTINATO, *args, "--coordinator", self.url], env=self.env, capture_output=True,
            text=True, timeout=30,
        )

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> float:
        at = time.monotonic()
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self.killed_at[pid] = at
        return at

    def passes(self, loop: str = "work") -> list[PassRecord]:
        starts: dict[tuple[int, int, int], PassRecord] = {}
        for path in self.records.glob("*.log"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) < 5 or parts[1] != loop:
                    continue
                pid, fence, start = int(parts[2]), int(parts[3]), int(parts[4]) / 1e9
                end = int(parts[5]) / 1e9 if parts[0] == "E" and len(parts) == 6 else None
                key = (pid, fence, int(parts[4]))
                if end is not None or key not in starts:
                    starts[key] = PassRecord(pid, fence, start, end)
        return sorted(starts.values(), key=lambda r: r.start)

    def wait(self, condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(0.01)

    def holder(self, loop: str = "work", since: float = 0.0, run: int = 5) -> int:
        """The runner that ran the last ``run`` passes of ``loop`` started after ``since``."""

        def settled() -> bool:
            recent = [r for r in self.passes(loop) if r.start > since][-run:]
            return len(recent) == run and len({r.pid for r in recent}) == 1

        self.wait(settled, what=f"one runner to run {run} passes of {loop} in a row")
        return self.passes(loop)[-1].pid

    def logs(self) -> str:
        """What every runner printed, last 3000 characters each."""
        out = []
        for index, proc in enumerate(self.procs):
            data = self._output(index).read_text(errors="replace")
            state = "running" if proc.poll() is None else f"exit {proc.returncode}"
            out.append(f"--- runner {proc.pid} {state}\n{data[-3000:]}")
        return "\n".join(out)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
            proc.wait(10)


def backend_url(backend: str, tmp_path: Path) -> str:
    """A fresh, isolated coordinator URL of ``backend`` (the server ones skip or fail if absent)."""
    tag = uuid.uuid4().hex[:10]
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ostinato.db'}"
    if backend == "redis":
        return f"{redis_url()}?prefix=proc-{tag}"
    if backend == "postgres":
        return f"{postgres_url()}?schema=proc_{tag}"
    raise AssertionError(backend)


async def _drop(url: str) -> None:
    coordinator = from_url(url)
    drop = getattr(coordinator, "drop_everything", None)
    if drop is not None:
        with contextlib.suppress(Exception):
            await drop()
    await coordinator.close()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each coordinator that runners on several processes can share, in turn."""
    url = backend_url(request.param, tmp_path)
    yield url
    if request.param != "sqlite":
        asyncio.run(_drop(url))


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(url: str | None = None, **env: str) -> Cluster:
        records = tmp_path / f"records{len(made)}"
        records.mkdir()
        full_env = {**os.environ, "OSTINATO_TEST_RECORDS": str(records), "PYTHONUNBUFFERED": "1",
                    **{f"OSTINATO_TEST_{k.upper()}": v for k, v in env.items()}}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).parents[2] / "src"), full_env.get("PYTHONPATH", "")]
        )
        cluster = Cluster(url or f"sqlite:///{tmp_path / 'ostinato.db'}", records, full_env)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop_all()
