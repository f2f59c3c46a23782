"""``store``: builds a ``Store`` of one kind and backend, dropped after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fencing.stores import Store

MakeStore = Callable[[str, str], Store]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MakeStore]:
    made: list[Store] = []

    def make(kind: str, backend: str) -> Store:
        made.append(Store(kind, backend, tmp_path))
        return made[-1]

    yield make
    for one in made:
        one.drop()
