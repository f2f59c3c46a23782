"""One real runner process holding 2,000 loops: all held, then no lease changes hands, and
a graceful stop gives every lease back.

The short version of ``bench/scale.py`` (10,000 loops, ten minutes). A runner that cannot
renew what it holds in time loses leases, and each loss is a hand-over with a new fence,
so a steady window with every fence unchanged and no ``lease lost`` line is the check.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import ostinato
from ostinato.coordinators import from_url
from tests.contract.conftest import backend_url

pytestmark = pytest.mark.slow

LOOPS = 2000
#: A short lease, so the steady window spans several renewal rounds and a lease whose
#: renewal fails runs out inside it.
LEASE = 3.0
STEADY = 2.5 * LEASE

APP = f'''
import ostinato

app = ostinato.App("scale", grace="2s")

async def idle(ctx):
    return ostinato.IDLE

for i in range({LOOPS}):
    app.loop(name=f"l{{i}}", lease="{LEASE:g}s", idle=("1s", "30s"))(idle)
'''


@pytest.fixture(params=["sqlite", "postgres",
                        pytest.param("redis", marks=pytest.mark.extended)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param != "sqlite":
        request.applymarker(pytest.mark.backend)
    made = backend_url(request.param, tmp_path)
    yield made
    if request.param != "sqlite":
        store = ostinato.App("cleanup", coordinator=made).connect()
        await store.open()
        await store.drop_everything()  # type: ignore[attr-defined]
        await store.close()


async def claims(url: str) -> dict[str, tuple[int, str | None]]:
    coordinator = from_url(url)
    await coordinator.open()
    try:
        return {r.key: (r.fence, r.holder) for r in await coordinator.loops()}
    finally:
        await coordinator.close()


def test_a_steady_runner_of_2000_loops_holds_them_all_and_loses_none(
    url: str, tmp_path: Path
) -> None:
    (tmp_path / "scale_app.py").write_text(APP)
    log = tmp_path / "runner.log"
    with log.open("wb") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "ostinato", "run", "scale_app:app", "--coordinator", url,
             "--log-level", "warning"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        held: dict[str, tuple[int, str | None]] = {}
        while time.monotonic() < deadline:
            time.sleep(1.0)
            held = {k: c for k, c in asyncio.run(claims(url)).items() if c[1] is not None}
            if len(held) == LOOPS:
                break
        assert len(held) == LOOPS, f"{len(held)} of {LOOPS} held after 60 s"
        before = asyncio.run(claims(url))
        time.sleep(STEADY)
        after = asyncio.run(claims(url))
        moved = sorted(k for k, (fence, _) in after.items() if before[k][0] != fence)
        assert moved == [], (f"{len(moved)} leases changed hands, such as {moved[:5]}; the "
                              f"runner's log ends:\n{log.read_text(errors='replace')[-3000:]}")
        assert all(holder is not None for _, holder in after.values())
        assert runner.poll() is None, "the runner ended"
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(30)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()
    text = log.read_text(errors="replace")
    assert "lease lost" not in text, text[-2000:]
    assert runner.returncode == 0, text[-2000:]
    # A graceful stop gives every lease back (a standby need not wait for them to expire).
    still = sorted(k for k, (_, holder) in asyncio.run(claims(url)).items() if holder is not None)
    assert still == [], f"{len(still)} leases left to expire after the stop, such as {still[:5]}"
    assert "could not release" not in text, text[-2000:]
