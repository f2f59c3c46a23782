"""What ``ostinato.fenced`` costs per transaction, on SQLite and on PostgreSQL.

Run it as ``.venv/bin/python bench/fencing.py`` (or ``make bench``). One run
takes well under a minute, prints a table and writes the figures, the
machine's facts, the goals and whether each was met to
``bench/results/fencing.json``.

What is measured, and how: the same small transaction (one INSERT into a data
table) is timed with and without the helper, on one connection, in the same
run. Plain is ``BEGIN IMMEDIATE; INSERT; COMMIT`` on SQLite (a WAL file under
the temporary folder, ``synchronous=NORMAL``) and psycopg's
``with conn.transaction(): INSERT`` on PostgreSQL (``DATABASE_URL``, default the
local server); fenced is ``with ostinato.fenced(conn, loop=..., fence=...):
INSERT``. The two alternate in blocks of ``BLOCK`` transactions, ``ROUNDS``
times, so drift of the machine touches both alike; the figures are medians
over the blocks of the time per transaction. On PostgreSQL the round trip of
one ``SELECT 1`` is timed the same way: the helper's goal is one extra
statement's worth.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ostinato

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    base_machine_facts,
    finish,
    in_us,
    judge,
    report_end,
    set_up_process,
    timestamp,
    verdict,
    write_json,
)

RESULTS = BENCH / "results" / "fencing.json"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
LOOP = "bench:fencing"
BLOCK = 200  # transactions per timed block
ROUNDS = 15  # blocks of each kind
WARMUP = 300

GOALS: dict[str, tuple[str, float]] = {
    # name: (comparison, bound)
    "sqlite_extra_s": ("<", 0.0002),
    "postgres_extra_statements": ("<", 1.5),  # extra time / one statement's round trip
}

log = logging.getLogger("bench")


def per_call(step: Callable[[], None]) -> float:
    """Seconds per call of ``step`` over one block."""
    start = time.perf_counter()
    for _ in range(BLOCK):
        step()
    return (time.perf_counter() - start) / BLOCK


def compare(steps: dict[str, Callable[[], None]]) -> dict[str, Any]:
    """Median seconds per call of each step, the steps' blocks alternating."""
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            times[name].append(per_call(step))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
            for name, t in times.items()}


def measure_sqlite(tmp: Path) -> dict[str, Any]:
    conn = sqlite3.connect(tmp / "bench.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE data (id INTEGER PRIMARY KEY, fence INTEGER)")
    insert = "INSERT INTO data (fence) VALUES (1)"

    def plain() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(insert)
        conn.execute("COMMIT")

    def fenced() -> None:
        with ostinato.fenced(conn, loop=LOOP, fence=1):
            conn.execute(insert)

    figures = compare({"plain": plain, "fenced": fenced})
    conn.close()
    return summarize(figures)


def measure_postgres(url: str) -> dict[str, Any]:
    try:
        import psycopg
    except ImportError:
        return {"skipped": "psycopg is not installed (pip install 'ostinato[postgres]')"}
    try:
        conn = psycopg.connect(url, connect_timeout=5)
    except psycopg.OperationalError as exc:
        return {"skipped": f"no PostgreSQL at {url}: {exc}".strip()}
    tag = uuid.uuid4().hex[:10]
    data, fences = f"bench_data_{tag}", f"bench_fences_{tag}"
    conn.autocommit = True
    conn.execute(f"CREATE TABLE {data} (id bigserial PRIMARY KEY, fence bigint)")
    conn.autocommit = False
    insert = f"INSERT INTO {data} (fence) VALUES (1)"  # noqa: S608

    def plain() -> None:
        with conn.transaction():
            conn.execute(insert)

    def fenced() -> None:
        with ostinato.fenced(conn, loop=LOOP, fence=1, table=fences):
            conn.execute(insert)

    def statement() -> None:
        conn.execute("SELECT 1")

    try:
        figures = compare({"plain": plain, "fenced": fenced, "statement": statement})
    finally:
        conn.rollback()
        conn.autocommit = True
        conn.execute(f"DROP TABLE IF EXISTS {data}, {fences}")
        conn.close()
    result = summarize(figures)
    result["statement_s"] = figures["statement"]["median_s"]
    result["extra_statements"] = result["extra_s"] / result["statement_s"]
    return result


def summarize(figures: dict[str, Any]) -> dict[str, Any]:
    plain, fenced = figures["plain"]["median_s"], figures["fenced"]["median_s"]
    return {"plain_s": plain, "fenced_s": fenced, "extra_s": fenced - plain, "ratio": fenced / plain,
            "blocks": figures}


def table(result: dict[str, Any]) -> str:
    m, lite, pg = result["machine"], result["sqlite"], result["postgres"]
    met = {g["key"]: g["met"] for g in result["goals"]}
    lines = [
        f"ostinato fencing benchmark, {result['timestamp']}",
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, SQLite {m['sqlite']}",
        "",
        f"one INSERT per transaction, medians of {ROUNDS} blocks of {BLOCK}, us per transaction",
        f"  sqlite    plain {in_us(lite['plain_s'])}   fenced {in_us(lite['fenced_s'])}   "
        f"extra {in_us(lite['extra_s'])} (goal < 200: {verdict(met['sqlite_extra_s'])})   "
        f"ratio {lite['ratio']:.2f}",
    ]
    if "skipped" in pg:
        lines.append(f"  postgres  skipped: {pg['skipped']}")
    else:
        lines.append(
            f"  postgres  plain {in_us(pg['plain_s'])}   fenced {in_us(pg['fenced_s'])}   "
            f"extra {in_us(pg['extra_s'])} = {pg['extra_statements']:.2f} x SELECT 1 "
            f"({in_us(pg['statement_s'])}) (goal < 1.5: {verdict(met['postgres_extra_statements'])})   "
            f"ratio {pg['ratio']:.2f}"
        )
    lines += report_end(result, RESULTS)
    return "\n".join(lines)


def run() -> dict[str, Any]:
    began = time.monotonic()
    url = os.environ.get("DATABASE_URL", POSTGRES_DEFAULT)
    result: dict[str, Any] = {
        "timestamp": timestamp(),
        "machine": base_machine_facts(),
        "settings": {"block": BLOCK, "rounds": ROUNDS, "warmup": WARMUP,
                     "sqlite": "WAL, synchronous=NORMAL, BEGIN IMMEDIATE",
                     "postgres_url": url.split("@")[-1]},
        "problems": [],
    }
    with tempfile.TemporaryDirectory(prefix="ostinato-bench-fencing-") as tmp:
        result["sqlite"] = measure_sqlite(Path(tmp))
    result["postgres"] = measure_postgres(url)
    checks: list[tuple[str, str, float | None]] = [
        ("extra time per transaction, sqlite", "sqlite_extra_s", result["sqlite"]["extra_s"]),
    ]
    if "skipped" in result["postgres"]:
        result["problems"].append(f"postgres: {result['postgres']['skipped']}")
    else:
        checks.append(("extra time per transaction in statements' round trips, postgres",
                       "postgres_extra_statements", result["postgres"]["extra_statements"]))
    finish(result, began, judge(checks, GOALS))
    return result


def main() -> int:
    set_up_process()
    result = run()
    write_json(RESULTS, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
