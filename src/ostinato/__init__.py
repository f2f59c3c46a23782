"""ostinato: continuous code. A function on repeat forever, one copy at a time, anywhere."""

from __future__ import annotations

from importlib import metadata as _metadata

from ostinato.app import App
from ostinato.coordinators import Coordinator, from_url
from ostinato.errors import (
    ConfigurationError,
    CoordinatorUnavailable,
    DeclarationError,
    MissingExtraError,
    OstinatoError,
    StaleFence,
    UnknownLoopError,
)
from ostinato.fencing import fenced
from ostinato.fencing_redis import redis_fenced
from ostinato.loop import IDLE, Pass

__all__ = [
    "IDLE",
    "App",
    "ConfigurationError",
    "Coordinator",
    "CoordinatorUnavailable",
    "DeclarationError",
    "MissingExtraError",
    "OstinatoError",
    "Pass",
    "StaleFence",
    "UnknownLoopError",
    "fenced",
    "from_url",
    "redis_fenced",
]

try:
    __version__ = _metadata.version("ostinato")  # one place: pyproject.toml's [project] version
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
