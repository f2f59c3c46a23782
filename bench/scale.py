"""Benchmark of one runner holding many loops: 100, 1,000 and 10,000 on each coordinator.

Run it as ``.venv/bin/python bench/scale.py`` (about 12 minutes with the default
60-second steady window; ``--steady 600`` for the ten-minute figure, ``--sizes``
and ``--backends`` to pick). It writes ``bench/results/scale.json`` (``--out`` for
another file) and prints a table.

For each coordinator (SQLite in a scratch folder, Redis under a prefix and
PostgreSQL in a schema made for the run, dropped at the end) and each size N, one
``ostinato run`` process hosts an app of N ``async def`` loops whose body returns
``ostinato.IDLE`` (``idle=("1s", "30s")``, the default 10 s lease). This process
reads the coordinator (``loops()``) every two seconds until all N are held; then,
for the steady window, it reads every lease's fence at the start and at the end
and the runner's CPU time (``/proc/<pid>/stat``), and the coordinator server's
CPU time and operations: Redis ``INFO`` (``used_cpu_*``,
``total_commands_processed``), PostgreSQL the CPU of every ``postgres`` process
and ``xact_commit`` of the database. SQLite has no server: its work is done in
the runner's own process and counted there. Leases lost are the runner's own
``lease lost`` log lines. Passes/s are the passes the runner reported in the window;
renewals/s (leases renewed) and coordinator calls/s (a batch of lease requests counts
once) come from the runner's metrics, scraped for those two alone around the window.

``--shapes`` adds, at the largest size, the same number of sync loops (``def``
bodies, to count the runner's threads), one loop of that many keys (``keys=``) and
one of that many partitions (``partitions=``).

Goals, from the issue that set them, for 10,000 loops: all held within 30 s of
the start; no fence changes during the steady window; runner CPU under 5 % of
one core; RSS under 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families

from ostinato.coordinators import from_url

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    base_machine_facts,
    finish,
    free_port,
    proc_stat,
    report_end,
    set_up_process,
    timestamp,
    write_json,
)
from coordinators import POSTGRES_URL, REDIS_URL, Namespaces  # noqa: E402

log = logging.getLogger("bench.scale")
RESULTS = BENCH / "results" / "scale.json"
SIZES = (100, 1000, 10000)
BACKENDS = ("sqlite", "redis", "postgres")
HELD_WITHIN_S = 30.0
RAMP_LIMIT_S = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

APP = '''
import os
import ostinato

app = ostinato.App("scale", grace="5s")
size, shape = int(os.environ["SCALE_LOOPS"]), os.environ["SCALE_SHAPE"]

async def idle(ctx):
    return ostinato.IDLE

def idle_sync(ctx):
    return ostinato.IDLE

if shape == "keys":
    app.loop(name="keyed", keys=lambda: [f"k{i}" for i in range(size)], idle=("1s", "30s"))(idle)
elif shape == "partitions":
    app.loop(name="parted", partitions=size, idle=("1s", "30s"))(idle)
else:
    for i in range(size):
        app.loop(name=f"l{i}", idle=("1s", "30s"))(idle_sync if shape == "sync" else idle)
'''
#: How the loops are made: ``plain`` (N async loops), ``sync`` (N sync loops), ``keys`` (one
#: loop of N keys), ``partitions`` (one loop of N partitions). Shapes other than ``plain`` run
#: at the largest size only.
SHAPES = ("plain", "sync", "keys", "partitions")


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def work(port: int) -> dict[str, float]:
    """The runner's leases renewed and coordinator calls so far, from its metrics (only those
    two, named in the query: a scrape of every loop would cost the runner CPU and memory)."""
    url = (f"http://127.0.0.1:{port}/metrics?name[]=ostinato_lease_renewals_total"
           "&name[]=ostinato_coordinator_calls_total")
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    at = time.monotonic()
    out = {"renewals": 0.0, "calls": 0.0, "at": at}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ostinato_lease_renewals_total":
                out["renewals"] += sample.value
            elif sample.name == "ostinato_coordinator_calls_total":
                out["calls"] += sample.value
    return out


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(name)


def postgres_cpu() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                total += cpu_seconds(int(entry.name))
    return total


def server_reading(backend: str) -> dict[str, float] | None:
    """The server's CPU seconds and operations so far (``None`` for SQLite: no server)."""
    if backend == "redis":
        with redis.Redis.from_url(REDIS_URL) as client:
            cpu = client.info("cpu")
            stats = client.info("stats")
        return {"cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                "ops": float(stats["total_commands_processed"])}
    if backend == "postgres":
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        return {"cpu_s": postgres_cpu(), "ops": float(row[0] if row else 0)}
    return None


async def read_fences(url: str) -> dict[str, tuple[int, str | None, int]]:
    """Each loop's fence, holder and passes so far (as last reported)."""
    coordinator = from_url(url)
    await coordinator.open()
    try:
        return {r.key: (r.fence, r.holder, r.passes) for r in await coordinator.loops()}
    finally:
        await coordinator.close()


def measure(backend: str, size: int, url: str, folder: Path, steady: float,
            shape: str = "plain") -> dict[str, Any]:
    app = folder / "scale_app.py"
    app.write_text(APP)
    log_path = folder / f"{backend}-{size}-{shape}.log"
    env = {**os.environ, "SCALE_LOOPS": str(size), "SCALE_SHAPE": shape}
    began = time.monotonic()
    port = free_port()
    with log_path.open("wb") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "ostinato", "run", f"{app}:app", "--coordinator", url,
             "--log-level", "warning", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=folder,
        )
    result: dict[str, Any] = {"backend": backend, "loops": size, "shape": shape,
                              "runner_pid": runner.pid}
    try:
        held_within = None
        held = 0
        while time.monotonic() - began < RAMP_LIMIT_S:
            time.sleep(2.0)
            with contextlib.suppress(Exception):  # the runner may not have made the schema yet
                held = sum(1 for _, holder, _ in asyncio.run(read_fences(url)).values() if holder)
            if held >= size:
                held_within = time.monotonic() - began
                break
        result["held_within_s"] = held_within
        result["held_after_ramp"] = held
        work0 = work(port)
        before = asyncio.run(read_fences(url))
        cpu0, wall0, server0 = cpu_seconds(runner.pid), time.monotonic(), server_reading(backend)
        # The runner's CPU minute by minute too: idle loops back off towards 30 s between
        # passes over the first minutes, so the last minute is the steady state.
        by_minute = []
        mark_cpu, mark_wall = cpu0, wall0
        while (left := wall0 + steady - time.monotonic()) > 0:
            time.sleep(min(60.0, left))
            now_cpu, now_wall = cpu_seconds(runner.pid), time.monotonic()
            by_minute.append(round(100 * (now_cpu - mark_cpu) / (now_wall - mark_wall), 2))
            mark_cpu, mark_wall = now_cpu, now_wall
        result["runner_cpu_pct_by_minute"] = by_minute
        cpu1, wall1, server1 = mark_cpu, mark_wall, server_reading(backend)
        after = asyncio.run(read_fences(url))
        work1 = work(port)
        window = wall1 - wall0
        span = work1["at"] - work0["at"]
        result["renewals_per_s"] = (work1["renewals"] - work0["renewals"]) / span
        result["coordinator_calls_per_s"] = (work1["calls"] - work0["calls"]) / span
        result["steady_s"] = window
        result["held_at_end"] = sum(1 for _, holder, _ in after.values() if holder)
        result["fence_changes"] = sum(
            1 for key, (fence, _, _) in after.items() if before.get(key, (None, None, 0))[0] != fence
        )
        result["passes_per_s"] = (
            sum(p for _, _, p in after.values()) - sum(p for _, _, p in before.values())
        ) / window
        result["runner_cpu_pct"] = 100 * (cpu1 - cpu0) / window
        result["rss_mb"] = status_field(runner.pid, "VmRSS") / 1024
        result["threads"] = status_field(runner.pid, "Threads")
        if server0 is not None and server1 is not None:
            result["server_cpu_pct"] = 100 * (server1["cpu_s"] - server0["cpu_s"]) / window
            result["server_ops_per_s"] = (server1["ops"] - server0["ops"]) / window
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(60)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()
    with contextlib.suppress(Exception):  # a graceful stop gives every lease back
        result["held_after_stop"] = sum(
            1 for _, holder, _ in asyncio.run(read_fences(url)).values() if holder
        )
    text = log_path.read_text(errors="replace")
    result["leases_lost"] = text.count("lease lost")
    result["runner_exit"] = runner.returncode
    return result


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row["loops"] != max(SIZES):
            continue
        name = f"{row['backend']} {row['loops']} {row.get('shape', 'plain')}"
        checks = [
            ("all held within 30 s", row.get("held_within_s"), "<=", HELD_WITHIN_S),
            ("fence changes in the steady window", row.get("fence_changes"), "==", 0),
            ("runner CPU % of one core", row.get("runner_cpu_pct"), "<", 5.0),
            ("runner CPU % of one core, the window's last minute",
             (row.get("runner_cpu_pct_by_minute") or [None])[-1], "<", 5.0),
            ("runner RSS MB", row.get("rss_mb"), "<", 150.0),
        ]
        for what, value, op, bound in checks:
            met = value is not None and (
                value <= bound if op == "<=" else value == bound if op == "==" else value < bound
            )
            out.append({"case": name, "goal": f"{what} {op} {bound:g}", "value": value, "met": met})
    return out


def table(result: dict[str, Any], out: Path) -> str:
    head = f"{'backend':9} {'shape':10} {'loops':>6} {'held in':>8} {'fences moved':>13} {'lost':>6} " \
           f"{'passes/s':>8} {'renew/s':>8} {'calls/s':>7} {'cpu %':>6} {'rss MB':>7} {'threads':>7} " \
           f"{'server cpu %':>12} {'server ops/s':>12}"
    lines = [head]
    for r in result["runs"]:

        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            value = r.get(key)
            return "-" if value is None else format(value, fmt)

        lines.append(
            f"{r['backend']:9} {r.get('shape', 'plain'):10} {r['loops']:>6} {f('held_within_s', '.1f'):>8} "
            f"{f('fence_changes', 'd'):>13} {r['leases_lost']:>6} {f('passes_per_s', '.0f'):>8} "
            f"{f('renewals_per_s', '.0f'):>8} {f('coordinator_calls_per_s', '.1f'):>7} "
            f"{f('runner_cpu_pct', '.1f'):>6} "
            f"{f('rss_mb', '.0f'):>7} {f('threads', 'd'):>7} {f('server_cpu_pct', '.1f'):>12} "
            f"{f('server_ops_per_s', '.0f'):>12}"
        )
    lines.append("")
    for goal in result["goals"]:
        lines.append(f"{'met ' if goal['met'] else 'MISSED'} {goal['case']}: {goal['goal']} "
                     f"(measured {goal['value']})")
    lines += report_end(result, out)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady state")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="plain runs at every size; the others at the largest only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--shapes-on", default=None,
                        help="the backends the shapes other than plain run on (default: all)")
    args = parser.parse_args()
    set_up_process()
    logging.getLogger("ostinato").setLevel(logging.WARNING)
    began = time.monotonic()
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "machine": base_machine_facts(),
        "settings": {"steady_s": args.steady, "idle": ["1s", "30s"], "lease": "10s",
                     "body": "returns ostinato.IDLE (async def; def for the sync shape)",
                     "shapes": args.shapes.split(",")},
        "runs": [],
    }
    cleanup: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ostinato-scale-")))
        spaces = Namespaces(tmp)
        stack.callback(lambda: cleanup.update(spaces.drop()))
        for backend in args.backends.split(","):
            sizes = [int(s) for s in args.sizes.split(",")]
            runs = [(size, "plain") for size in sizes if "plain" in args.shapes.split(",")]
            if args.shapes_on is None or backend in args.shapes_on.split(","):
                runs += [(max(sizes), s) for s in args.shapes.split(",") if s != "plain"]
            for size, shape in runs:
                url = spaces.url(backend, f"s{size}{shape[0]}")
                log.info("%s, %d loops, %s", backend, size, shape)
                row = measure(backend, size, url, tmp, args.steady, shape)
                log.info("%s", row)
                result["runs"].append(row)
    result["cleanup"] = cleanup
    result["problems"] = [f"cleanup incomplete: {cleanup}"] if (
        cleanup.get("redis_keys_left") or cleanup.get("postgres_schemas_left") or cleanup.get("errors")
    ) else []
    finish(result, began, goals(result["runs"]))
    write_json(args.out, result)
    print(table(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
