"""ostinato: one back-to-back loop (``@app.loop``, no pacing, default 10 s lease).

``ostinato run peers_apps.ostinato_loop:app --coordinator URL``. When the pass
finds no work the loop returns ``ostinato.IDLE`` and waits for a wake-up with
the default idle backoff (100 ms to 5 s).
"""

from __future__ import annotations

import ostinato
from peers_apps.common import run_pass

app = ostinato.App("bench-peers")


@app.loop
def spin(ctx: ostinato.Pass) -> object:
    return None if run_pass() else ostinato.IDLE
