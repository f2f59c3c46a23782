"""ostinato: continuous code. A function on repeat forever, one copy at a time, anywhere."""

from __future__ import annotations

from ostinato.app import App
from ostinato.coordinators import Coordinator, from_url
from ostinato.errors import (
    ConfigurationError,
    CoordinatorUnavailable,
    DeclarationError,
    MissingExtraError,
    OstinatoError,
    UnknownLoopError,
)
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
    "UnknownLoopError",
    "from_url",
]

__version__ = "0.1.0"
