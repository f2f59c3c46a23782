"""Test doubles for code that uses ostinato: an in-memory coordinator and a clock you move."""

from __future__ import annotations

from dataclasses import dataclass

from ostinato.coordinators.memory import MemoryCoordinator, MemoryStore, memory_store

__all__ = ["FakeClock", "MemoryCoordinator", "MemoryStore", "memory_store"]


@dataclass
class FakeClock:
    """A monotonic clock that moves only when told: ``MemoryStore(clock=clock)``."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
