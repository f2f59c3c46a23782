"""The ingest tier over HTTP: 202 once stored, 4xx naming the field, totals from committed windows only."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import pytest
from examples.pipeline import loops
from examples.pipeline.ingest import create_app
from examples.pipeline.model import MAX_BODY
from examples.pipeline.store import Store
from examples.pipeline.store_redis import RedisStore

import ostinato


@contextmanager
def serving(store: Store | RedisStore) -> Iterator[str]:
    """The ingest tier on ``store``, served by uvicorn from a thread of this process; its base URL."""
    import uvicorn

    from ostinato.dashboard import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(store, None), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the ingest tier did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers or {},  # noqa: S310 - a local server
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def bundle(**overrides: object) -> bytes:
    now = time.time()
    doc: dict[str, object] = {"app": "shop", "source": "web",
                              "samples": [{"t": now, "queue_ms": 12.5}, {"t": now, "queue_ms": 3}]}
    doc.update(overrides)
    return json.dumps(doc).encode()


@pytest.fixture
def base(store: Store | RedisStore) -> Iterator[str]:
    with serving(store) as url:
        yield url


def test_a_good_bundle_is_stored_and_answered_202(base: str, store: Store | RedisStore) -> None:
    """202 with the number of samples, and the bundle is in the inbox by then."""
    assert call(f"{base}/v1/metrics", bundle()) == (202, {"samples": 2})
    with closing(store.connect()) as conn:
        assert store.depth(conn) == 1


@pytest.mark.parametrize(("overrides", "field", "status"), [
    ({"app": "no spaces"}, "app", 422),
    ({"source": "cron"}, "source", 422),
    ({"samples": [{"t": 1.0, "queue_ms": 1}]}, "samples[0].t", 422),
    ({"samples": [{"t": time.time(), "queue_ms": "slow"}]}, "samples[0].queue_ms", 422),
    ({"samples": [{"t": time.time(), "queue_ms": 1}] * 1001}, "samples", 413),
])
def test_a_bad_bundle_gets_a_4xx_naming_the_field_and_is_not_stored(
    base: str, store: Store | RedisStore, overrides: dict[str, object], field: str, status: int,
) -> None:
    """The answer names the field and says why; nothing reaches the inbox."""
    code, answer = call(f"{base}/v1/metrics", bundle(**overrides))
    assert (code, answer["field"]) == (status, field)
    assert answer["error"]
    with closing(store.connect()) as conn:
        assert store.depth(conn) == 0


def test_a_body_over_the_limit_is_refused_before_it_is_read(base: str) -> None:
    """A Content-Length over the limit gets 413 naming the body; so does invalid JSON get 400."""
    code, answer = call(f"{base}/v1/metrics", b" " * (MAX_BODY + 10))
    assert (code, answer["field"]) == (413, "body")
    code, answer = call(f"{base}/v1/metrics", b"{oops")
    assert (code, answer["field"]) == (400, "body")


def test_totals_and_windows_come_from_committed_windows_only(base: str, store: Store | RedisStore) -> None:
    """Accepted but not yet drained bundles are not in the totals; after a pass they are, once."""
    for _ in range(3):
        assert call(f"{base}/v1/metrics", bundle())[0] == 202
    assert call(f"{base}/v1/totals") == (200, {"bundles": 0, "samples": 0})
    loops.aggregate(ostinato.Pass("aggregate", app="pipeline", fence=1, partition=0, partitions=1))
    assert call(f"{base}/v1/totals") == (200, {"bundles": 3, "samples": 6})
    code, answer = call(f"{base}/v1/apps/shop/windows")
    assert code == 200
    assert sum(w["count"] for w in answer["windows"]) == 6
    assert {"start", "count", "p50", "p95", "p99", "max"} <= set(answer["windows"][0])
    assert call(f"{base}/v1/apps/shop/windows?width=7")[0] == 400
    code, stats = call(f"{base}/v1/stats")
    assert (code, stats["queue_depth"], stats["rejected"]) == (200, 0, 0)
    assert stats["batches"]["bundles"] == 3
