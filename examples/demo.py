"""``make demo``: two runners of the metrics app on SQLite, a kill -9, and a live status table.

It shows passes happening, the loops staying with one runner each, the holder
being killed, and the survivor taking every loop over within a fraction of a
second, with a greater fence.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OSTINATO = [sys.executable, "-m", "ostinato"]


def status(url: str) -> str:
    result = subprocess.run([*OSTINATO, "status", "--coordinator", url], capture_output=True,
                            text=True, check=False)
    return result.stdout.rstrip() or result.stderr.rstrip()


def show(url: str, title: str) -> None:
    print(f"\n=== {title} ===\n{status(url)}\n", flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ostinato-demo-"))
    url = f"sqlite:///{work / 'ostinato.db'}"
    env = {**os.environ, "METRICS_DB": str(work / "metrics.db"), "PYTHONUNBUFFERED": "1"}
    runners: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*OSTINATO, "run", f"{HERE / 'metrics.py'}:app", "--coordinator",
                                 url, "--log-level", "info"], env=env)
        runners.append(proc)
        return proc

    try:
        print(f"two runners of examples/metrics.py:app on {url}", flush=True)
        first = start()
        time.sleep(1.0)
        second = start()
        for n in range(4):
            time.sleep(1.5)
            show(url, f"status after {1.0 + 1.5 * (n + 1):.1f}s")
        print(f"\n*** kill -9 of runner {first.pid}, the holder of every loop ***\n", flush=True)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(1.0)
        show(url, f"1s after the kill: runner {second.pid} holds every loop, fences went up")
        time.sleep(3.0)
        show(url, "3s later")
        print(f"*** SIGTERM to runner {second.pid}: finishes its passes, releases, exits 0 ***",
              flush=True)
        second.send_signal(signal.SIGTERM)
        print(f"runner exited with {second.wait(35)}", flush=True)
        show(url, "after a graceful stop: no runner")
    finally:
        for proc in runners:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
