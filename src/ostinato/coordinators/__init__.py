"""Coordinators: where leases live. ``from_url`` picks one by the URL's scheme."""

from __future__ import annotations

from ostinato.coordinators.protocol import (
    Coordinator,
    Denied,
    Event,
    Grant,
    LoopRecord,
    LoopStats,
    Renewal,
    RunnerInfo,
    RunnerRecord,
    Setting,
)
from ostinato.coordinators.urls import redact
from ostinato.errors import ConfigurationError, MissingExtraError

__all__ = [
    "Coordinator",
    "Denied",
    "Event",
    "Grant",
    "LoopRecord",
    "LoopStats",
    "Renewal",
    "RunnerInfo",
    "RunnerRecord",
    "Setting",
    "from_url",
    "redact",
]

SCHEMES = "memory://, sqlite:///path.db, redis://, rediss://, postgresql://"


def from_url(url: str) -> Coordinator:
    """Build the coordinator a URL names; raise ``ConfigurationError`` if it names none."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"bad coordinator URL {redact(str(url))!r}: expected one of {SCHEMES}"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        from ostinato.coordinators.memory import MemoryCoordinator

        return MemoryCoordinator(url.split("://", 1)[1])
    if scheme == "sqlite":
        from ostinato.coordinators.sqlite import SQLiteCoordinator

        return SQLiteCoordinator(url)
    if scheme in ("redis", "rediss"):
        try:
            import redis  # noqa: F401
        except ImportError:
            raise MissingExtraError("the Redis coordinator", "redis") from None
        from ostinato.coordinators.redis import RedisCoordinator  # type: ignore[import-not-found,unused-ignore]

        return RedisCoordinator(url)  # type: ignore[no-any-return,unused-ignore]
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise MissingExtraError("the PostgreSQL coordinator", "postgres") from None
        from ostinato.coordinators.postgres import PostgresCoordinator  # type: ignore[import-not-found,unused-ignore]

        return PostgresCoordinator(url)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigurationError(
        f"unknown coordinator scheme {scheme!r} in {redact(url)!r}: expected one of {SCHEMES}"
    )
