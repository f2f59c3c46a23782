"""One fixture, ``make``, that builds coordinators of one backend sharing one store.

Each call of ``make()`` returns a new, opened coordinator over the same store,
as separate runner processes would have. Every contract test runs once per
backend.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ostinato.coordinators import Coordinator, from_url
from ostinato.coordinators.memory import MemoryCoordinator, MemoryStore
from tests.servers import postgres_url, redis_url

Make = Callable[[], Awaitable[Coordinator]]

BACKENDS = ["memory", "sqlite", "redis", "postgres"]


def backend_url(backend: str, tmp_path: Path) -> str:
    tag = uuid.uuid4().hex[:10]
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    if backend == "redis":
        return f"{redis_url()}?prefix=test-{tag}"
    if backend == "postgres":
        return f"{postgres_url()}?schema=test_{tag}"
    raise AssertionError(backend)


@pytest.fixture(params=BACKENDS)
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    backend = request.param
    opened: list[Coordinator] = []
    store = MemoryStore()
    url = None if backend == "memory" else backend_url(backend, tmp_path)

    async def factory() -> Coordinator:
        coordinator = MemoryCoordinator(store=store) if url is None else from_url(url)
        await coordinator.open()
        opened.append(coordinator)
        return coordinator

    yield factory
    for coordinator in opened:
        await coordinator.close()
    drop = getattr(opened[0], "drop_everything", None) if opened else None
    if drop is not None:
        await drop()
