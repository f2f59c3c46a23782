"""Structured log lines: every notable event carries ``event``, ``loop``, ``fence`` and ``runner``.

The text format shows the message; ``--log-format json`` prints one JSON object
per line with those fields, for machines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: The fields a notable event may carry besides its message.
FIELDS = ("event", "loop", "fence", "runner")


def fields(event: str, *, loop: str | None = None, fence: int | None = None,
           runner: str | None = None) -> dict[str, Any]:
    """The ``extra=`` of a log call for a notable event."""
    return {"event": event, "loop": loop, "fence": fence, "runner": runner}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the event fields, any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for a runner process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
