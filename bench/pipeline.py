"""The example pipeline (examples/pipeline) under load: ingest latency, aggregation capacity and lag,
and exactly-once accounting across kill -9s of the aggregator's holder.

    .venv/bin/python bench/pipeline.py [--stores sqlite,postgresql,redis] [--seconds 15] [--kills 10]

For each store it starts the ingest tier and two runners on this machine and:

1. posts at 1,000 and at 5,000 bundles/s (open loop, ``python -m examples.pipeline load``)
   and records the load generator's latency (from when each POST was due to its 202),
   the deepest queue seen (sampled every 0.5 s) and the lag from receipt to a committed
   window (the aggregator's own histogram of ``commit time - received``);
2. measures the aggregator's capacity: with the runners stopped, 50,000 bundles are put
   in the inbox directly, the runners are started and the time from every partition held
   to an empty queue is taken (bundles/s);
3. posts at 1,000 bundles/s while killing (-9) the runner that holds the most aggregator
   partitions ``--kills`` times, starting a new runner after each, then compares the load
   generator's count of accepted bundles and samples with ``/v1/totals``.

The coordinator is SQLite in the scratch folder for every store; the Redis store uses
``$PIPELINE_BENCH_REDIS`` (default database 9 of the local server) under a prefix of its
own, deleted at the end. The load generator,
the ingest tier and the runners share this machine's CPUs (and with anything else
running): the load average is recorded beside every figure. Results go to
``bench/results/pipeline.json``.
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
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from examples.pipeline.model import Bundle  # noqa: E402
from examples.pipeline.store import Store  # noqa: E402
from examples.pipeline.store_redis import RedisStore  # noqa: E402

import ostinato  # noqa: E402
from ostinato.coordinators import from_url  # noqa: E402

RESULTS = BENCH / "results" / "pipeline.json"
POSTGRES = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("PIPELINE_BENCH_REDIS", "redis://127.0.0.1:6379/9")
GOALS: dict[str, common.Goal] = {
    "ingest_p99_ms_at_1000": ("<", 10.0),
    "aggregation_bundles_per_s": (">=", 5000.0),
    "lag_p99_ms_at_1000": ("<", 1000.0),
    "lost_or_double_counted_samples": ("<", 1.0),
}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own local server
        return json.loads(response.read())


class Pipeline:
    """The ingest tier and runners of one store, in a scratch folder."""

    def __init__(self, tmp: Path, store_url: str | None, schema: str) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OSTINATO_", "PIPELINE_"))}
        # A PYTHONPATH given to the benchmark is kept, after the repository's root (so the
        # processes can run an ostinato other than the installed one, such as a snapshot).
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.update(PIPELINE_DATA=str(tmp), PIPELINE_SCHEMA=schema, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        if store_url:
            self.env["PIPELINE_STORE"] = store_url
        self.store: Store | RedisStore
        if store_url and store_url.startswith("redis"):
            self.env["PIPELINE_REDIS_PREFIX"] = schema
            self.store = RedisStore(store_url, prefix=schema)
        else:
            self.store = Store(store_url or f"sqlite:///{tmp / 'pipeline.db'}", schema=schema)
        self.coordinator = f"sqlite:///{tmp / 'ostinato.db'}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.runners: dict[str, subprocess.Popen[bytes]] = {}
        self.base = ""

    def spawn(self, name: str, *argv: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=self.env,
                                    stdout=stdout or log, stderr=log)
        self.procs.append(proc)
        return proc

    def wait(self, what: str, check: Any, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, KeyError):
                value = check()
                if value:
                    return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what}; logs in {self.tmp}")
            time.sleep(0.05)

    def serve(self) -> None:
        port = common.free_port()
        self.spawn("serve", "-m", "examples.pipeline", "serve", "--port", str(port))
        self.base = f"http://127.0.0.1:{port}"
        self.wait("the ingest tier", lambda: get_json(f"{self.base}/v1/totals"))

    def runner(self) -> str:
        proc = self.spawn(f"runner-{len(self.procs)}", "-m", "ostinato", "run",
                          "examples.pipeline.loops:app", "--log-level", "warning")
        label = f"{socket.gethostname()}:{proc.pid}"
        self.runners[label] = proc
        return label

    def holders(self) -> dict[str, tuple[str | None, int]]:
        async def read() -> dict[str, tuple[str | None, int]]:
            coordinator = from_url(self.coordinator)
            await coordinator.open()
            try:
                return {r.key: (r.holder, r.fence) for r in await coordinator.loops()
                        if r.key.startswith("pipeline:aggregate#")}
            finally:
                await coordinator.close()

        return asyncio.run(read())

    def all_held(self) -> bool:
        held = self.holders()
        return len(held) == 4 and all(h in self.runners for h, _ in held.values())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = get_json(f"{self.base}/v1/stats")
        return result

    def load(self, rate: float, seconds: float) -> subprocess.Popen[bytes]:
        return self.spawn("load", "-m", "examples.pipeline", "load", "--url", self.base, "--rate", str(rate),
                          "--seconds", str(seconds), "--connections", "512", stdout=subprocess.PIPE)

    def stop_runners(self) -> None:
        for proc in self.runners.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.runners.values():
            proc.wait(30)
        self.runners.clear()

    def stop(self) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        for proc in alive:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def machine_cpu() -> tuple[float, float]:
    """CPU-seconds this machine spent busy and in all, summed over its CPUs, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def process_cpu(pid: int) -> float:
    """CPU-seconds (user and system) process ``pid`` used so far; 0 when it is gone."""
    try:
        fields = common.proc_stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuShares:
    """Who used the CPUs over a span: the ingest process, the load generator (a child reaped
    meanwhile, read from ``RUSAGE_CHILDREN``), the runners, and everything else on the machine
    (the database server, the kernel's own work, other people's processes)."""

    def __init__(self, pipe: Pipeline) -> None:
        import resource

        self.pipe, self._resource = pipe, resource
        self.server = pipe.procs[0].pid
        self.runners = [p.pid for p in pipe.runners.values()]
        self.began = time.monotonic()
        self.machine = machine_cpu()
        self.ingest = process_cpu(self.server)
        self.runner_cpu = sum(process_cpu(pid) for pid in self.runners)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children = usage.ru_utime + usage.ru_stime

    def end(self, requests: int) -> dict[str, Any]:
        took = time.monotonic() - self.began
        busy, total = (b - a for a, b in zip(self.machine, machine_cpu(), strict=True))
        ingest = process_cpu(self.server) - self.ingest
        runners = sum(process_cpu(pid) for pid in self.runners) - self.runner_cpu
        usage = self._resource.getrusage(self._resource.RUSAGE_CHILDREN)
        generator = usage.ru_utime + usage.ru_stime - self.children
        return {
            "seconds": round(took, 2), "cpus": os.cpu_count(),
            "busy_cores": round(busy / took, 2), "idle_cores": round((total - busy) / took, 2),
            "ingest_cores": round(ingest / took, 2), "generator_cores": round(generator / took, 2),
            "runners_cores": round(runners / took, 2),
            "everything_else_cores": round((busy - ingest - generator - runners) / took, 2),
            "ingest_cpu_ms_per_request": round(1000 * ingest / max(requests, 1), 3),
        }


def ingest_run(pipe: Pipeline, rate: float, seconds: float) -> dict[str, Any]:
    """Load at ``rate`` for ``seconds``: the generator's summary, the deepest queue, the lag, and
    who used the CPUs meanwhile."""
    began_wall = time.time()
    load_before = os.getloadavg()[0]
    shares = CpuShares(pipe)
    load = pipe.load(rate, seconds)
    depths: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        # From the store on a connection of its own, not through /v1/stats: that endpoint
        # decodes every recent window (6 to 13 ms of the ingest process's CPU a call), which
        # would load the very process whose latency is measured.
        with contextlib.closing(pipe.store.connect()) as conn:
            while not stop.wait(0.5):
                with contextlib.suppress(Exception):
                    depths.append(pipe.store.depth(conn))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = load.communicate(timeout=seconds + 120)
    summary = json.loads(out.decode().strip().splitlines()[-1])
    cpu = shares.end(summary["sent"])
    stop.set()
    sampler.join()
    pipe.wait("an empty queue", lambda: pipe.stats()["queue_depth"] == 0, timeout=120)
    with contextlib.closing(pipe.store.connect()) as conn:
        lag = pipe.store.lag_total(conn, began_wall - 10)
    return {
        "rate": rate, "seconds": seconds, "load": summary,
        "max_queue_depth": max(depths, default=0), "cpu": cpu,
        "lag_ms": {"count": lag.count, "p50": round(lag.quantile(0.5), 1),
                   "p99": round(lag.quantile(0.99), 1), "max": round(lag.max, 1)},
        "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
    }


def capacity(pipe: Pipeline, count: int = 50_000) -> dict[str, Any]:
    """The aggregator's drain rate: ``count`` bundles in the inbox, two runners started."""
    pipe.stop_runners()
    now = time.time()
    with contextlib.closing(pipe.store.connect()) as conn:
        for first in range(0, count, 5000):
            batch = [(Bundle(f"app-{i % 20:03d}", "web",
                             tuple((now - (i % 10) * 0.1, float(i % 97)) for _ in range(10))), now)
                     for i in range(first, min(count, first + 5000))]
            pipe.store.add(conn, batch)
    for _ in range(2):
        pipe.runner()
    pipe.wait("every partition held", pipe.all_held)
    began = time.monotonic()
    pipe.wait("an empty queue", lambda: pipe.stats()["queue_depth"] == 0, timeout=300)
    took = time.monotonic() - began
    return {"bundles": count, "samples_per_bundle": 10, "seconds": round(took, 3),
            "bundles_per_s": round(count / took, 1), "loadavg_1m": os.getloadavg()[0]}


def kills(pipe: Pipeline, count: int, rate: float = 1000.0) -> dict[str, Any]:
    """``count`` kill -9s of the holder of the most partitions during load; the books after."""
    before = pipe.stats()["totals"]
    load = pipe.load(rate, 5 + 2.5 * count)
    takeovers = []
    for _ in range(count):
        time.sleep(2.5)
        held = pipe.holders()
        mine: dict[str, list[str]] = {}
        for key, (holder, _) in held.items():
            if holder in pipe.runners:
                mine.setdefault(holder, []).append(key)
        victim = max(mine, key=lambda h: len(mine[h]))
        pipe.runners.pop(victim).kill()
        killed = time.monotonic()
        pipe.runner()
        pipe.wait("the takeover", lambda v=victim, h=held, m=mine: all(
            (now := pipe.holders())[k][0] not in (None, v) and now[k][1] > h[k][1] for k in m[v]))
        takeovers.append(round(time.monotonic() - killed, 3))
    out, _ = load.communicate(timeout=120)
    summary = json.loads(out.decode().strip().splitlines()[-1])
    pipe.wait("an empty queue", lambda: pipe.stats()["queue_depth"] == 0, timeout=120)
    time.sleep(0.5)
    after = pipe.stats()["totals"]
    counted = {"bundles": after["bundles"] - before["bundles"],
               "samples": after["samples"] - before["samples"]}
    return {
        "kills": count, "rate": rate, "load": summary, "takeover_s": takeovers,
        "counted_in_windows": counted,
        "lost_or_double_counted_bundles": abs(summary["accepted"] - counted["bundles"]),
        "lost_or_double_counted_samples": abs(summary["samples_accepted"] - counted["samples"]),
        "loadavg_1m": os.getloadavg()[0],
    }


def wake_cost(pipe: Pipeline) -> dict[str, Any]:
    """What a wake-up costs: over the ingest tier's open connection, and by ``app.wake`` (a
    connection made per call), which is why the ingest tier keeps one open."""
    import ostinato

    app = ostinato.App("pipeline", coordinator=pipe.coordinator)
    app.loop(partitions=4, name="aggregate")(lambda ctx: None)
    began = time.perf_counter()
    for i in range(20):
        app.wake(f"aggregate#{i % 4}")
    per_call = (time.perf_counter() - began) / 20
    wakes = pipe.stats().get("wakes", {})
    return {"open_connection_mean_ms": round(wakes.get("mean_ms", 0.0), 3), "sent": wakes.get("sent"),
            "app_wake_per_call_ms": round(per_call * 1000, 3)}


def run_store(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-pipeline-{kind}-"))
    schema = f"bench_pipeline_{uuid.uuid4().hex[:8]}"
    pipe = Pipeline(tmp, {"postgresql": POSTGRES, "redis": REDIS}.get(kind), schema)
    result: dict[str, Any] = {"store": kind}
    try:
        pipe.serve()
        for _ in range(2):
            pipe.runner()
        pipe.wait("every partition held", pipe.all_held)
        result["ingest"] = []
        for rate in args.rates:
            common.log.info("%s: %d bundles/s for %gs", kind, rate, args.seconds)
            result["ingest"].append(ingest_run(pipe, rate, args.seconds))
        result["wake"] = wake_cost(pipe)
        common.log.info("%s: aggregation capacity", kind)
        result["capacity"] = capacity(pipe)
        common.log.info("%s: %d kill -9s during load", kind, args.kills)
        result["kills"] = kills(pipe, args.kills)
    finally:
        pipe.stop()
        if kind == "postgresql":
            import psycopg

            with contextlib.suppress(Exception), psycopg.connect(POSTGRES, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if isinstance(pipe.store, RedisStore):
            client = pipe.store.connect()
            for key in client.scan_iter(match=f"{schema}:*", count=1000):
                client.delete(key)
            client.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> list[str]:
    lines = []
    for kind in result["stores"]:
        r = result[kind]
        lines.append(f"{kind}:")
        for run in r["ingest"]:
            lat = run["load"]["latency_ms"]
            lines.append(f"  {run['rate']:>5.0f}/s  ingest p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
                         f"accepted {run['load']['accepted']}/{run['load']['sent']}  "
                         f"queue max {run['max_queue_depth']}  lag p50 {run['lag_ms']['p50']:.0f} ms  "
                         f"p99 {run['lag_ms']['p99']:.0f} ms  (load {run['loadavg_1m_before']:.1f})")
            cpu = run["cpu"]
            lines.append(f"         generator late p99 {run['load']['late_ms']['p99']:.1f} ms; cores busy "
                         f"{cpu['busy_cores']} of {cpu['cpus']}: ingest {cpu['ingest_cores']} "
                         f"({cpu['ingest_cpu_ms_per_request']} ms a request), generator "
                         f"{cpu['generator_cores']}, runners {cpu['runners_cores']}, everything else "
                         f"{cpu['everything_else_cores']}")
        c = r["capacity"]
        lines.append(f"  aggregation capacity {c['bundles_per_s']:.0f} bundles/s "
                     f"({c['bundles']} in {c['seconds']}s)")
        k = r["kills"]
        takeover = max(k["takeover_s"], default="-")
        lines.append(f"  {k['kills']} kill -9s: lost or double-counted samples "
                     f"{k['lost_or_double_counted_samples']}, takeover max {takeover} s")
        lines.append(f"  wake-up: {r['wake']['open_connection_mean_ms']} ms on an open connection, "
                     f"{r['wake']['app_wake_per_call_ms']} ms by app.wake()")
    for goal in result["goals"]:
        lines.append(f"{goal['figure']}: {goal['value']} (goal {goal['goal']}): "
                     f"{common.verdict(goal['met'])}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--stores", default="sqlite,postgresql,redis")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[250.0, 1000.0, 5000.0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    common.set_up_process()
    began = time.monotonic()
    stores = args.stores.split(",")
    result: dict[str, Any] = {"timestamp": common.timestamp(), "machine": common.base_machine_facts(),
                              "settings": {"seconds": args.seconds, "rates": args.rates, "kills": args.kills,
                                           "runners": 2, "partitions": 4, "coordinator": "sqlite",
                                           # Which ostinato ran (a PYTHONPATH may name another
                                           # than the working tree's, whose edits are listed above).
                                           "ostinato": str(Path(ostinato.__file__).parent),
                                           "pythonpath": os.environ.get("PYTHONPATH")},
                              "stores": stores, "problems": []}
    for kind in stores:
        result[kind] = run_store(kind, args)
    checks = []
    for kind in stores:
        r = result[kind]
        at_1000 = next((run for run in r["ingest"] if run["rate"] == 1000.0), None)
        if at_1000 is not None:
            checks.append((f"{kind} ingest p99 ms at 1,000/s", "ingest_p99_ms_at_1000",
                           at_1000["load"]["latency_ms"]["p99"]))
            checks.append((f"{kind} lag p99 ms at 1,000/s", "lag_p99_ms_at_1000", at_1000["lag_ms"]["p99"]))
        checks.append((f"{kind} aggregation bundles/s", "aggregation_bundles_per_s",
                       r["capacity"]["bundles_per_s"]))
        checks.append((f"{kind} lost or double-counted samples over {args.kills} kills",
                       "lost_or_double_counted_samples", r["kills"]["lost_or_double_counted_samples"]))
    common.finish(result, began, common.judge(checks, GOALS))
    common.write_json(args.out, result)
    print("\n".join(report(result) + common.report_end(result, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
