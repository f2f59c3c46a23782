"""The README's complete example runs as printed."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A complete example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README has no complete example"
    return match.group(1)


def test_the_readme_example_drains_orders_into_totals(tmp_path: Path) -> None:
    """Saved as shop.py and run with ``ostinato run``, the example fills its totals and
    stops cleanly on SIGTERM."""
    (tmp_path / "shop.py").write_text(example())
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSTINATO_")}
    runner = subprocess.Popen([sys.executable, "-m", "ostinato", "run", "shop.py:app"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    totals: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not totals:
            assert runner.poll() is None, runner.communicate()[0]
            time.sleep(0.2)
            if (tmp_path / "shop.db").exists():
                try:
                    with sqlite3.connect(tmp_path / "shop.db") as db:
                        totals = db.execute("SELECT account, cents FROM totals").fetchall()
                except sqlite3.OperationalError:  # the tables are not there yet
                    pass
    finally:
        runner.send_signal(signal.SIGTERM)
        output = runner.communicate(timeout=30)[0]
    assert runner.returncode == 0, output
    assert totals, output
    assert {account for account, _ in totals} <= {"ann", "bob"}
    assert all(cents > 0 for _, cents in totals)
    assert "Traceback" not in output, output
