"""The pipeline as processes for the tests: the ingest tier, runners and the load generator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ostinato.coordinators import from_url

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], T], timeout: float = 30.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except (OSError, KeyError):  # not up yet, or not recorded yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.05)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the test's own server
        return json.loads(response.read())


@dataclass
class Stack:
    """Processes sharing ``tmp`` as ``$PIPELINE_DATA``: SQLite store and coordinator."""

    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    runners: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    base: str = ""

    @classmethod
    def make(cls, tmp: Path, **env: str) -> Stack:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("OSTINATO_", "PIPELINE_"))}
        clean.update(PIPELINE_DATA=str(tmp), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **env)
        return cls(tmp, clean)

    @property
    def coordinator(self) -> str:
        return f"sqlite:///{self.tmp / 'ostinato.db'}"

    def spawn(self, name: str, *argv: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=self.env,
                                    stdout=stdout or log, stderr=log)
        self.procs.append(proc)
        return proc

    def serve(self) -> str:
        port = free_port()
        self.spawn("serve", "-m", "examples.pipeline", "serve", "--port", str(port))
        self.base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_json(f"{self.base}/v1/totals"), what="the ingest tier")
        return self.base

    def runner(self, target: str = "examples.pipeline.loops:app") -> str:
        proc = self.spawn(f"runner-{len(self.runners)}", "-m", "ostinato", "run", target,
                          "--log-level", "info")
        label = f"{socket.gethostname()}:{proc.pid}"
        self.runners[label] = proc
        return label

    def load(self, rate: float, seconds: float, seed: int = 1) -> subprocess.Popen[bytes]:
        return self.spawn("load", "-m", "examples.pipeline", "load", "--url", self.base, "--rate",
                          str(rate), "--seconds", str(seconds), "--seed", str(seed), stdout=subprocess.PIPE)

    def holders(self, prefix: str = "pipeline:aggregate#") -> dict[str, tuple[str | None, int]]:
        async def read() -> dict[str, tuple[str | None, int]]:
            coordinator = from_url(self.coordinator)
            await coordinator.open()
            try:
                return {r.key: (r.holder, r.fence) for r in await coordinator.loops()
                        if r.key.startswith(prefix)}
            finally:
                await coordinator.close()

        return asyncio.run(read())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get_json(f"{self.base}/v1/stats")
        return result

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM to every process still running, SIGKILL after 10 s."""
        alive = [p for p in self.procs if p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in alive:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()
