"""Stores for the pipeline's tests: SQLite in a scratch folder, PostgreSQL in a schema of the test's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from examples.pipeline import loops
from examples.pipeline.store import Store

from tests.servers import postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.backend)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The pipeline's store on SQLite or PostgreSQL, installed as the loops' store for the test."""
    if request.param == "sqlite":
        made = Store(f"sqlite:///{tmp_path / 'pipeline.db'}")
    else:
        made = Store(postgres_url(), schema=f"pipeline_test_{uuid.uuid4().hex[:12]}")
    saved = loops._store
    loops._store = made
    loops._conns.clear()
    try:
        yield made
    finally:
        for conn in loops._conns.values():
            conn.close()
        loops._conns.clear()
        loops._store = saved
        if made.dialect == "postgresql":
            import psycopg

            with psycopg.connect(made.url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{made.schema}" CASCADE')
