"""Every error ostinato raises on purpose.

::

    OstinatoError
     ├── ConfigurationError        a setting is wrong: URL, APP path, option
     │    └── DeclarationError     a loop declaration is wrong (names loop and field)
     ├── MissingExtraError         an optional dependency is not installed
     ├── CoordinatorUnavailable    the coordinator cannot be reached right now
     ├── StaleFence                a newer holder's fence is recorded: the write was refused
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


class StaleFence(OstinatoError):
    """A fenced write was refused: a greater fence of the loop is already recorded.

    Raised by ``ostinato.fenced`` and ``ostinato.redis_fenced`` before anything of
    the refused transaction or batch is kept. A newer holder runs the loop now, so
    the pass that gets this should simply end.
    """

    def __init__(self, loop: str, fence: int, newer: int) -> None:
        self.loop = loop
        self.fence = fence
        self.newer = newer
        super().__init__(
            f"loop {loop!r}: fence {fence} is stale, a newer holder recorded fence {newer}; "
            "the write was refused and nothing of it was kept (let this pass end)"
        )

    def __reduce__(self) -> tuple[type[StaleFence], tuple[str, int, int]]:
        return StaleFence, (self.loop, self.fence, self.newer)


class UnknownLoopError(OstinatoError):
    """No loop of that name is known to the coordinator."""
