"""Every error ostinato raises on purpose.

::

    OstinatoError
     ├── ConfigurationError        a setting is wrong: URL, APP path, option
     │    └── DeclarationError     a loop declaration is wrong (names loop and field)
     ├── MissingExtraError         an optional dependency is not installed
     ├── CoordinatorUnavailable    the coordinator cannot be reached right now
     └── UnknownLoopError          no loop of that name is known to the coordinator

Each message says what is wrong and what to do about it.
"""

from __future__ import annotations


class OstinatoError(Exception):
    """The root of every error raised by ostinato on purpose."""


class ConfigurationError(OstinatoError):
    """A setting is wrong: a coordinator URL, an APP path, a command-line option."""


class DeclarationError(ConfigurationError):
    """A loop declaration is wrong; the message names the loop and the field."""

    def __init__(self, loop: str, field: str, problem: str) -> None:
        self.loop = loop
        self.field = field
        super().__init__(f"loop {loop!r}, {field}=: {problem}")


class MissingExtraError(OstinatoError):
    """An optional dependency is missing; the message names the pip install to run."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs an optional dependency: run  pip install 'ostinato[{extra}]'"
        )


class CoordinatorUnavailable(OstinatoError):
    """The coordinator could not be reached; runners retry with backoff."""


class UnknownLoopError(OstinatoError):
    """No loop of that name is known to the coordinator."""
