"""The runner's log lines: every event carries its fields, and hosted loops are seen."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import ostinato
from ostinato import logs
from ostinato.loop import Pass
from tests.runner.test_runner import until


async def test_a_pass_cancelled_at_its_timeout_logs_every_event_field() -> None:
    """With the JSON format, the timed-out pass's line names its event, loop, fence and runner."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("ostinato")
    logger.addHandler(handler)
    app = ostinato.App("log", coordinator=f"memory://{uuid.uuid4().hex}", grace="1s")
    ended: list[int] = []

    @app.loop(timeout="50ms", error_backoff=("1ms", "2ms"))
    async def slow(ctx: Pass) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            ended.append(ctx.fence)

    try:
        async with app.running():
            await until(lambda: len(ended) >= 2)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    timed_out = [line for line in lines if "cancelled after its timeout" in line["message"]]
    assert timed_out, lines
    for line in lines:
        assert {"event", "runner"} <= line.keys(), line
    assert timed_out[0]["event"] == "pass_timed_out"
    assert timed_out[0]["loop"] == "log:slow"
    assert timed_out[0]["fence"] == ended[0]
    assert timed_out[0]["runner"].endswith(f":{__import__('os').getpid()}")


HOSTED = """
import asyncio, logging, sys
import ostinato

if sys.argv[1] == "uvicorn-like":  # a server that configures only its own loggers
    logging.getLogger("uvicorn").addHandler(logging.StreamHandler())
    logging.getLogger("uvicorn").propagate = False
elif sys.argv[1] == "host-handlers":  # a program with its own root handler at WARNING
    logging.basicConfig(level=logging.WARNING, format="HOST %(levelname)s %(name)s %(message)s")

app = ostinato.App("hosted", coordinator="memory://hosted")
done = asyncio.Event()

@app.loop(pause="10ms")
async def tick(ctx):
    if ctx.number == 3:
        done.set()

async def main():
    async with app.running():
        await done.wait()

asyncio.run(main())
"""


def test_hosted_loops_log_their_info_events(tmp_path: Path) -> None:
    """Under a server that configures only its own loggers, and under a program with its
    own handlers, a hosted runner's INFO events are printed, formatted."""
    script = tmp_path / "hosted.py"
    script.write_text(HOSTED)
    expected = {"uvicorn-like": " INFO    ostinato.loop: ", "host-handlers": "HOST INFO ostinato.loop "}
    for mode, prefix in expected.items():
        result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if "lease acquired" in line]
        assert len(lines) == 1, result.stderr
        assert prefix in lines[0], lines[0]
