"""Structured log lines: every notable event carries ``event``, ``loop``, ``fence`` and ``runner``.

The text format shows the message; ``--log-format json`` prints one JSON object
per line with those fields, for machines.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import IO, Any

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
        if "runner" not in out and record.name.startswith("ostinato"):
            out["runner"] = _here()  # every runner of a process is labelled host:pid
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_set_up = False


def _here() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


#: The text format of ``ostinato run`` and ``configure``.
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _formatter(fmt: str) -> logging.Formatter:
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} is not one of text, json")
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(
    format: str = "text", level: str = "info", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Give the ``ostinato`` loggers a handler of their own, in ostinato's text or JSON format,
    for a program that hosts loops under a server that configures only its own loggers
    (uvicorn, gunicorn). Lines go to ``stream`` (stderr) and no longer also reach the
    root logger, so none is printed twice. Calling it again replaces the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_formatter(format))
    handler.set_name("ostinato")
    logger = logging.getLogger("ostinato")
    logger.handlers[:] = [h for h in logger.handlers if h.get_name() != "ostinato"] + [handler]
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    return handler


def make_visible() -> None:
    """What ``app.running()`` does so that a hosted runner's events are seen: with no handler
    anywhere on the way (uvicorn's default, a bare script), ``configure()``; with the host's
    handlers, and no level set on ``ostinato`` by the host, let INFO through to them."""
    logger = logging.getLogger("ostinato")
    if _set_up:  # ostinato run, or the program called setup(): leave its level alone
        return
    if not logger.hasHandlers():
        configure()
    elif logger.level == logging.NOTSET and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for a runner process."""
    global _set_up
    _set_up = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
