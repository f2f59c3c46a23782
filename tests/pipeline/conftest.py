"""Stores for the pipeline's tests: SQLite in a scratch folder, PostgreSQL in a schema of the test's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from examples.pipeline import loops
from examples.pipeline.store import Store
from examples.pipeline.store_redis import RedisStore

from tests.servers import postgres_url, redis_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.backend),
                        pytest.param("redis", marks=pytest.mark.backend)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store | RedisStore]:
    """The pipeline's store on SQLite, PostgreSQL or Redis, installed as the loops' store for the test."""
    made: Store | RedisStore
    if request.param == "sqlite":
        made = Store(f"sqlite:///{tmp_path / 'pipeline.db'}")
    elif request.param == "postgresql":
        made = Store(postgres_url(), schema=f"pipeline_test_{uuid.uuid4().hex[:12]}")
    else:
        prefix = f"pipeline-test-{uuid.uuid4().hex[:12]}"
        made = RedisStore(redis_url(), prefix=prefix)
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
        if isinstance(made, RedisStore):
            from tests.pipeline.test_exactly_once import forget

            forget(made)
        elif made.dialect == "postgresql":
            import psycopg

            with psycopg.connect(made.url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{made.schema}" CASCADE')
