"""An isolated cron loop's child process gets the slot its pass stands for."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.process.conftest import OSTINATO

pytestmark = pytest.mark.slow

APP = '''
import os
import ostinato

app = ostinato.App("isocron", grace="3s")

@app.loop(cron="* * * * * *", timezone="Europe/Berlin", isolation="process")
def tick(ctx):
    with open(os.environ["RECORDS"], "a") as out:
        out.write(f"{os.getpid()} {ctx.scheduled_for.isoformat()} {ctx.missed}\\n")
'''


def test_an_isolated_cron_pass_knows_its_slot(tmp_path: Path) -> None:
    (tmp_path / "isocron.py").write_text(APP)
    records = tmp_path / "records.txt"
    output = tmp_path / "runner.log"
    with output.open("wb") as out:
        runner = subprocess.Popen(
            [*OSTINATO, "run", "isocron.py:app", "--coordinator", f"sqlite:///{tmp_path / 'c.db'}"],
            cwd=tmp_path, env={**os.environ, "RECORDS": str(records)}, stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not records.exists() or len(records.read_text().splitlines()) < 2:
            assert runner.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "no isolated passes recorded"
            time.sleep(0.05)
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
    lines = [line.split() for line in records.read_text().splitlines()]
    for pid, slot, missed in lines:
        assert int(pid) != runner.pid  # ran in the child
        when = datetime.fromisoformat(slot)
        assert when.utcoffset() in (timedelta(hours=1), timedelta(hours=2))  # Berlin's offsets
        assert when.microsecond == 0
        assert missed == "0"
