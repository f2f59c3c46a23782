"""Bundles are checked field by field, and windows fold and merge queue times within the histogram's error."""

from __future__ import annotations

import json
import math
import random

import pytest
from examples.pipeline.model import (
    MAX_BODY,
    MAX_SAMPLES,
    BadBundle,
    Window,
    fold,
    parse_bundle,
    partition_of,
    slots_of,
)

NOW = 1_800_000_000.0


def body(**overrides: object) -> bytes:
    doc: dict[str, object] = {"app": "shop", "source": "web", "samples": [{"t": NOW, "queue_ms": 12.5}]}
    doc.update(overrides)
    return json.dumps(doc).encode()


def refused(raw: bytes) -> BadBundle:
    with pytest.raises(BadBundle) as caught:
        parse_bundle(raw, NOW)
    return caught.value


def test_a_good_bundle_is_parsed() -> None:
    """App, source and (t, queue_ms) pairs come back as sent."""
    bundle = parse_bundle(body(samples=[{"t": NOW - 1, "queue_ms": 3}, {"t": NOW, "queue_ms": 0.5}]), NOW)
    assert (bundle.app, bundle.source, bundle.samples) == ("shop", "web", ((NOW - 1, 3.0), (NOW, 0.5)))


@pytest.mark.parametrize(("raw", "field", "status", "words"), [
    (b"{not json", "body", 400, "is not JSON"),
    (b"[1, 2]", "body", 422, "must be a JSON object"),
    (json.dumps({"source": "web", "samples": []}).encode(), "app", 422, "is missing"),
    (body(app=""), "app", 422, "1 to 64 letters"),
    (body(app="a b"), "app", 422, "1 to 64 letters"),
    (body(app=7), "app", 422, "1 to 64 letters"),
    (body(source="cron"), "source", 422, "must be one of web, worker"),
    (body(samples={}), "samples", 422, "must be a list"),
    (body(samples=[]), "samples", 422, "is empty"),
    (body(extra=1), "extra", 422, "is not a field of a bundle"),
    (body(samples=[{"t": NOW}]), "samples[0].queue_ms", 422, "is missing"),
    (body(samples=[{"t": NOW, "queue_ms": 1}, 5]), "samples[1]", 422, "must be an object"),
    (body(samples=[{"t": "now", "queue_ms": 1}]), "samples[0].t", 422, "must be a number"),
    (body(samples=[{"t": True, "queue_ms": 1}]), "samples[0].t", 422, "must be a number"),
    (body(samples=[{"t": NOW - 7200, "queue_ms": 1}]), "samples[0].t", 422, "old"),
    (body(samples=[{"t": NOW + 3600, "queue_ms": 1}]), "samples[0].t", 422, "in the future"),
    (body(samples=[{"t": NOW, "queue_ms": -1}]), "samples[0].queue_ms", 422, "from 0 to"),
    (body(samples=[{"t": NOW, "queue_ms": 1, "ms": 2}]), "samples[0].ms", 422, "not a field of a sample"),
    (body(samples=[{"t": NOW, "queue_ms": 1}] * (MAX_SAMPLES + 1)), "samples", 413, f"at most {MAX_SAMPLES}"),
    (b" " * (MAX_BODY + 1), "body", 413, f"at most {MAX_BODY}"),
])
def test_a_bad_bundle_is_refused_naming_the_field(raw: bytes, field: str, status: int, words: str) -> None:
    """Each mistake is refused with the field it is in, a status that fits it and words that say why."""
    bad = refused(raw)
    assert (bad.field, bad.status) == (field, status)
    assert words in bad.message
    assert bad.body() == {"error": bad.message, "field": field}


def test_a_non_finite_queue_time_is_refused() -> None:
    """NaN and infinity, which Python's JSON reads, are refused too."""
    assert refused(b'{"app":"a","source":"web","samples":[{"t":1800000000,"queue_ms":NaN}]}').field == \
        "samples[0].queue_ms"


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_window_quantiles_are_within_the_bucket_error_of_the_exact_ones() -> None:
    """p50, p95 and p99 read from the histogram are within 2 % of the exact nearest-rank values."""
    rng = random.Random(7)
    values = [rng.lognormvariate(2.5, 1.2) for _ in range(20_000)]
    window = Window()
    for v in values:
        window.add(v)
    assert window.count == len(values)
    assert window.max == max(values)
    for q in (0.5, 0.95, 0.99):
        assert window.quantile(q) == pytest.approx(exact(values, q), rel=0.02)


def test_windows_merged_from_parts_equal_one_window_of_everything() -> None:
    """Folding in several passes and merging gives the window one pass would give."""
    rng = random.Random(3)
    bundles = [("shop", [[NOW + rng.random() * 30, rng.random() * 100] for _ in range(rng.randint(1, 20))])
               for _ in range(300)]
    whole = fold(bundles)
    parts = [fold(bundles[:100]), fold(bundles[100:])]
    for key, window in whole.windows.items():
        rebuilt = Window()
        for part in parts:
            if key in part.windows:
                rebuilt.merge(Window.decode(part.windows[key].count, part.windows[key].max,
                                            part.windows[key].encode()))
        assert (rebuilt.count, rebuilt.max, rebuilt.buckets) == (window.count, window.max, window.buckets)
    assert whole.bundles == {"shop": 300}
    assert whole.samples["shop"] == sum(len(s) for _, s in bundles)


def test_every_slot_belongs_to_exactly_one_partition() -> None:
    """The partitions' slots cover all 64 slots once, and an app's partition holds its slot."""
    for partitions in (1, 2, 4, 8, 64):
        covered = sorted(s for p in range(partitions) for s in slots_of(p, partitions))
        assert covered == list(range(64))
    from examples.pipeline.model import slot_of
    assert slot_of("shop") in slots_of(partition_of("shop", 4), 4)
