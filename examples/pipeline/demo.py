"""``make demo``: the ingest tier, two runners, 1,000 bundles a second, a kill -9, and the books balanced.

Everything runs on this machine on SQLite, in a scratch folder
(``$TMPDIR/pipeline-demo-*``) removed on every exit. What it prints about the
kill (which partitions the killed runner held, who holds them after, with which
fence) is read from the coordinator, and the final comparison sets the load
generator's own count of accepted samples against ``/v1/totals``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from examples.pipeline.store import Store

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
AGGREGATE = "pipeline:aggregate#"


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own local server
        return json.loads(response.read())


def holders(url: str) -> dict[str, tuple[str | None, int]]:
    """Each aggregator partition's holder (``host:pid``, None when free) and fence, as recorded."""
    from ostinato.coordinators import from_url

    async def read() -> dict[str, tuple[str | None, int]]:
        coordinator = from_url(url)
        await coordinator.open()
        try:
            return {r.key: (r.holder, r.fence) for r in await coordinator.loops()
                    if r.key.startswith(AGGREGATE)}
        finally:
            await coordinator.close()

    return asyncio.run(read())


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Demo:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        port = args.port or free_port()
        if not port_free(port):
            fallback = free_port()
            print(f"port {port} is in use; using {fallback}", flush=True)
            port = fallback
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.coordinator = f"sqlite:///{work / 'ostinato.db'}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OSTINATO_", "PIPELINE_"))}
        self.env.update(PIPELINE_DATA=str(work), PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.runners: dict[str, subprocess.Popen[bytes]] = {}
        self.load: subprocess.Popen[bytes] | None = None
        self.took: float | None = None

    def spawn(self, name: str, *argv: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        # A session of its own: Ctrl-C reaches the demo only, which stops the rest in order.
        proc = subprocess.Popen([PY, *argv], cwd=ROOT, env=self.env, stdout=stdout or log,
                                stderr=log, start_new_session=True)
        self.procs.append(proc)
        return proc

    def runner(self) -> str:
        proc = self.spawn(f"runner-{len(self.runners) + 1}", "-m", "ostinato", "run",
                          "examples.pipeline.loops:app", "--log-level", "info")
        label = f"{socket.gethostname()}:{proc.pid}"
        self.runners[label] = proc
        print(f"started runner {label}", flush=True)
        return label

    def wait_until(self, what: str, check: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                value = check()
                if value:
                    return value
            if time.monotonic() > deadline:
                raise SystemExit(f"!!! gave up waiting for {what} after {timeout:.0f}s; logs in {self.work}")
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get_json(f"{self.base}/v1/stats")
        return result

    def line(self, began: float) -> None:
        s = self.stats()
        lag = s["lag"][-1] if s["lag"] else {"p50": 0, "p99": 0}
        print(f"  t={time.monotonic() - began:5.1f}s  accepted {s['batches']['bundles']:>7} bundles"
              f"  in windows {s['totals']['bundles']:>7}  queue {s['queue_depth']:>5}"
              f"  lag p50/p99 {lag['p50']:.0f}/{lag['p99']:.0f} ms", flush=True)

    def kill_holder(self) -> float:
        """kill -9 the runner holding the most aggregator partitions; the takeover time (s)."""
        before = holders(self.coordinator)
        held: dict[str, list[str]] = {}
        for key, (holder, _) in sorted(before.items()):
            if holder in self.runners:
                held.setdefault(holder, []).append(key)
        victim = max(held, key=lambda h: len(held[h]))
        self.runners[victim].kill()
        self.runners[victim].wait()
        killed = time.monotonic()
        parts = ", ".join(f"{k.removeprefix('pipeline:')} (fence {before[k][1]})" for k in held[victim])
        print(f"\n*** kill -9 of runner {victim}, the holder of {parts} ***", flush=True)

        def moved() -> dict[str, tuple[str | None, int]] | None:
            now = holders(self.coordinator)
            done = all(now[k][0] not in (None, victim) and now[k][1] > before[k][1] for k in held[victim])
            return now if done else None

        after = self.wait_until("the takeover", moved)
        took = time.monotonic() - killed
        print(f"=== {took * 1000:.0f} ms later every partition it held has a live holder with a "
              "greater fence (read from the coordinator) ===", flush=True)
        for key in held[victim]:
            print(f"  {key.removeprefix('pipeline:'):<12} {victim} fence {before[key][1]} -> "
                  f"{after[key][0]} fence {after[key][1]}", flush=True)
        del self.runners[victim]
        self.runner()
        print("  (a new runner started in its place: a hot standby)\n", flush=True)
        return took

    def run(self) -> bool:
        args = self.args
        serve = self.spawn("serve", "-m", "examples.pipeline", "serve", "--port", str(self.port))
        self.wait_until("the ingest tier",
                        lambda: serve.poll() is None and get_json(f"{self.base}/v1/totals"))
        print(f"ingest tier on {self.base} (SQLite in {self.work})", flush=True)
        self.runner()
        self.runner()
        self.wait_until("every aggregator partition to be held",
                        lambda: (h := holders(self.coordinator)) and all(v[0] for v in h.values()))
        seconds = 0 if args.forever else args.seconds
        self.load = self.spawn("load", "-m", "examples.pipeline", "load", "--url", self.base,
                               "--rate", str(args.rate), "--seconds", str(seconds),
                               stdout=subprocess.PIPE)
        print(f"""
Where to look:
  the page:      {self.base}/   (ingest rate, queue depth, lag, windows per app)
  one app:       {self.base}/v1/apps/app-001/windows
  totals:        {self.base}/v1/totals
  the loops:     .venv/bin/ostinato status --coordinator {self.coordinator}
  the logs:      {self.work}/*.log
load: {args.rate:.0f} bundles/s {'until Ctrl-C' if args.forever else f'for {args.seconds:.0f}s'}
""", flush=True)
        began = time.monotonic()
        kill_at = args.kill_after if args.kill_after is not None else max(3.0, args.seconds / 3)
        next_line = began + 5.0
        while self.load.poll() is None:
            now = time.monotonic()
            if self.took is None and now - began >= kill_at:
                self.took = self.kill_holder()
            if now >= next_line:
                self.line(began)
                next_line += 5.0 if args.seconds <= 30 else 10.0
            time.sleep(0.1)
        return self.finish()

    def stop_load(self) -> None:
        if self.load is not None and self.load.poll() is None:
            self.load.send_signal(signal.SIGTERM)

    def finish(self) -> bool:
        assert self.load is not None
        out, _ = self.load.communicate(timeout=60)
        summary = json.loads(out.decode().strip().splitlines()[-1])
        print("\nload finished; waiting for the aggregator to drain the queue", flush=True)
        self.wait_until("an empty queue", lambda: self.stats()["queue_depth"] == 0, timeout=60)
        totals = get_json(f"{self.base}/v1/totals")
        store = Store(f"sqlite:///{self.work / 'pipeline.db'}")
        with contextlib.closing(store.connect()) as conn:
            lag = store.lag_total(conn, 0)
        agree = bool(totals["samples"] == summary["samples_accepted"]
                     and totals["bundles"] == summary["accepted"])
        print(f"""
=== summary ===
  sent {summary['sent']} bundles in {summary['seconds']:.0f}s; accepted (202) {summary['accepted']},
  rejected {summary['rejected']}, failed connections {summary['errors']}, unanswered {summary['unanswered']}
  ingest latency p50 {summary['latency_ms']['p50']:.1f} ms, p99 {summary['latency_ms']['p99']:.1f} ms, \
max {summary['latency_ms']['max']:.1f} ms (from when each POST was due)
  lag from receipt to a committed window: p50 {lag.quantile(0.5):.0f} ms, p99 {lag.quantile(0.99):.0f} ms
  takeover after the kill -9: {'-' if self.took is None else f'{self.took * 1000:.0f} ms'}
  the load generator counted {summary['accepted']} bundles / {summary['samples_accepted']} samples accepted
  /v1/totals (committed windows) {totals['bundles']} bundles / {totals['samples']} samples
  {'they agree: nothing lost, nothing counted twice' if agree else 'THEY DISAGREE'}
""", flush=True)
        return agree

    def stop(self) -> None:
        """SIGTERM to everything still running, SIGKILL after 10 s."""
        self.stop_load()
        alive = [p for p in self.procs if p.poll() is None]
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + 10.0
        for proc in alive:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _exit_on(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on)
    # Ctrl-C even where the demo was started with SIGINT ignored (a shell's background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="pipeline-demo-"))
    demo = Demo(work, args)
    try:
        ok = demo.run()
    except KeyboardInterrupt:
        if not args.forever or demo.load is None:
            print("\ninterrupted: stopping", flush=True)
            return 130
        print("\nCtrl-C: stopping the load", flush=True)
        demo.stop_load()
        try:
            ok = demo.finish()
        except KeyboardInterrupt:
            return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        demo.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"stopped everything and removed {work}", flush=True)
    return 0 if ok else 1
