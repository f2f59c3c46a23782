"""The page in a headless browser, and the demo from start to its summary."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.observe.conftest import browser  # noqa: F401 - the project's headless Chromium fixture
from tests.pipeline.stack import ROOT, Stack, wait_for


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_charts_ingest_queue_lag_and_each_applications_windows(
    tmp_path: Path, browser: Any,  # noqa: F811 - the fixture imported above
) -> None:
    """Under load, the page shows the committed totals /v1/stats reports and draws points in the
    ingest, queue, lag and per-application charts, without a script error."""
    stack = Stack.make(tmp_path)
    try:
        base = stack.serve()
        stack.runner()
        load = stack.load(rate=200, seconds=6)
        wait_for(lambda: stack.stats()["totals"]["bundles"] > 0 and stack.stats()["ingest"], what="data")
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")
        for chart in ("#chart-ingest", "#chart-depth", "#chart-lag"):
            page.wait_for_function(f"Number(document.querySelector('{chart}').dataset.points) > 0",
                                   timeout=15_000)
        page.wait_for_function("document.querySelectorAll('figure.app').length >= 5", timeout=15_000)
        load.communicate(timeout=30)
        wait_for(lambda: stack.stats()["queue_depth"] == 0, what="an empty queue")
        totals = stack.stats()["totals"]
        page.wait_for_function(f"document.getElementById('bundles').textContent === '{totals['bundles']}'",
                               timeout=10_000)
        assert page.text_content("#samples") == str(totals["samples"])
        apps = page.eval_on_selector_all("figure.app figcaption", "els => els.map(e => e.textContent)")
        assert all(re.match(r"app-\d{3}: \d+ samples; last window p99 [\d.]+ ms", a) for a in apps), apps
        assert page.eval_on_selector_all(
            "figure.app canvas", "els => els.every(c => Number(c.dataset.points) > 0)")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert errors == []
    finally:
        stack.stop()


@pytest.mark.extended
@pytest.mark.slow
def test_the_demo_kills_a_holder_and_shows_the_numbers_agree(tmp_path: Path) -> None:
    """A short demo: the kill names partitions whose fences went up, the totals agree with the
    load generator, it exits 0 and removes its folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSTINATO_", "PIPELINE_"))}
    env.update(TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "examples.pipeline", "demo", "--seconds", "8", "--rate", "300",
         "--port", "0", "--kill-after", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert time.monotonic() - began < 40
    assert re.search(r"^\*\*\* kill -9 of runner \S+, the holder of aggregate#\d", out, re.M), out
    moves = re.findall(r"^  (aggregate#\d+)\s+(\S+) fence (\d+) -> (\S+) fence (\d+)$", out, re.M)
    assert moves, out
    assert all(old != new and int(after) > int(before) for _, old, before, new, after in moves), moves
    assert "they agree: nothing lost, nothing counted twice" in out
    assert re.search(r"the load generator counted (\d+) bundles / (\d+) samples", out)
    counted = re.search(r"the load generator counted (\d+) bundles / (\d+) samples", out)
    totals = re.search(r"/v1/totals \(committed windows\) (\d+) bundles / (\d+) samples", out)
    assert counted is not None
    assert totals is not None
    assert counted.groups() == totals.groups()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.extended
@pytest.mark.slow
def test_ctrl_c_ends_a_demo_run_forever_with_its_summary(tmp_path: Path) -> None:
    """--forever runs until SIGINT, then stops the load, drains, prints the agreeing summary,
    exits 0 and removes its folder; the processes it started are gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSTINATO_", "PIPELINE_"))}
    env.update(TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.pipeline", "demo", "--forever", "--rate", "200", "--port", "0",
         "--kill-after", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("  (a new runner started in its place"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "Ctrl-C: stopping the load" in out
    assert "they agree: nothing lost, nothing counted twice" in out
    assert list(tmp_path.iterdir()) == []
    pids = [int(p) for p in re.findall(r"^started runner \S+:(\d+)$", out, re.M)]
    assert len(pids) == 3, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
