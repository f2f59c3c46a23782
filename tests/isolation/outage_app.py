"""Loops whose passes run long, for the test of a coordinator lost mid-pass."""

from __future__ import annotations

import asyncio
import os
import time

import ostinato

RECORDS = os.environ.get("OSTINATO_TEST_RECORDS", "/tmp")
app = ostinato.App("outage")


@app.loop(isolation="process", lease="1s")
def isolated(ctx: ostinato.Pass) -> None:
    with open(f"{RECORDS}/isolated.pid", "w") as out:
        out.write(str(os.getpid()))
    time.sleep(60)


@app.loop(lease="1s")
async def in_loop(ctx: ostinato.Pass) -> None:
    await asyncio.sleep(60)
