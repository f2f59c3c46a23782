"""``ostinato next``: the next start times of a loop, as a user runs the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

APP = """
import ostinato

app = ostinato.App("shop", coordinator="memory://shop")

@app.loop(cron="30 2 * * *", timezone="Europe/Berlin", catchup="6h", jitter="30s")
def nightly(ctx): ...

@app.loop(cron="*/30 * * * *", timezone="America/New_York")
def halfhourly(ctx): ...

@app.loop(cron="0 2 * * *", timezone="Australia/Lord_Howe")
def at_two(ctx): ...

@app.loop(every="90m")
def rollup(ctx): ...

@app.loop(pause="1s")
def drain(ctx): ...
"""


def ostinato_next(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "shop.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTINATO_")}
    return subprocess.run(
        [sys.executable, "-m", "ostinato", "next", "shop.py:app", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_a_nightly_start_through_both_berlin_nights(tmp_path: Path) -> None:
    """02:30 runs at 03:00 on the night it does not exist and once on the night it exists
    twice, each line carrying the offset of its day."""
    spring = ostinato_next(tmp_path, "--loop", "nightly", "--after", "2025-03-29T12:00", "--count", "3")
    assert spring.returncode == 0, spring.stderr
    assert spring.stdout.splitlines() == [
        "2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00", "2025-04-01T02:30:00+02:00",
    ]
    autumn = ostinato_next(tmp_path, "--loop", "shop:nightly", "--after", "2025-10-25T12:00+02:00",
                           "--count", "2")
    assert autumn.stdout.splitlines() == ["2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]


def test_a_half_hourly_line_runs_through_new_yorks_repeated_hour(tmp_path: Path) -> None:
    """``*/30`` keeps starting every half hour of real time while 01:00-02:00 shows twice."""
    done = ostinato_next(tmp_path, "--loop", "halfhourly", "--after", "2025-11-02T00:45",
                         "--count", "6")
    assert done.stdout.splitlines() == [
        "2025-11-02T01:00:00-04:00", "2025-11-02T01:30:00-04:00",
        "2025-11-02T01:00:00-05:00", "2025-11-02T01:30:00-05:00",
        "2025-11-02T02:00:00-05:00", "2025-11-02T02:30:00-05:00",
    ]


def test_lord_howes_half_hour_skip(tmp_path: Path) -> None:
    """02:00 does not exist when Lord Howe moves from +10:30 to +11:00: it runs at 02:30."""
    done = ostinato_next(tmp_path, "--loop", "at_two", "--after", "2025-10-04T12:00", "--count", "2")
    assert done.stdout.splitlines() == ["2025-10-05T02:30:00+11:00", "2025-10-06T02:00:00+11:00"]


def test_json_for_machines(tmp_path: Path) -> None:
    """``--json`` gives the loop, its schedule, zone and jitter, and the starts."""
    done = ostinato_next(tmp_path, "--loop", "nightly", "--after", "2025-03-29T12:00", "--count",
                         "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "loop": "shop:nightly", "cron": "30 2 * * *", "every": None, "zone": "Europe/Berlin",
        "jitter": 30.0, "starts": ["2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00"],
    }


def test_an_every_loop_counts_from_after(tmp_path: Path) -> None:
    """``every=`` has no calendar: its starts are ``after`` plus whole multiples of it."""
    done = ostinato_next(tmp_path, "--loop", "rollup", "--after", "2025-03-30T00:00:00+00:00",
                         "--count", "2")
    assert done.stdout.splitlines() == ["2025-03-30T01:30:00+00:00", "2025-03-30T03:00:00+00:00"]


def test_the_default_is_five_starts_from_now(tmp_path: Path) -> None:
    """Without ``--after`` and ``--count``, the next five starts from now."""
    done = ostinato_next(tmp_path, "--loop", "nightly")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5
    assert all(line[10:] in ("T02:30:00+01:00", "T02:30:00+02:00", "T03:00:00+02:00")
               for line in lines)


@pytest.mark.parametrize(("args", "message"), [
    (["--loop", "nightly", "--after", "tomorrow"], "--after 'tomorrow' is not an ISO 8601 time"),
    (["--loop", "nightley"], "app 'shop' has no loop named 'nightley'; its loops are shop:nightly"),
    (["--loop", "drain"], "loop 'shop:drain' has no schedule: it runs pause=1s after each pass"),
    (["--loop", "nightly", "--count", "0"], "Invalid value for '--count'"),
    ([], "Missing option '--loop'"),
])
def test_bad_arguments_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """A bad time, an unknown loop or a loop without a schedule is named in one line."""
    done = ostinato_next(tmp_path, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
