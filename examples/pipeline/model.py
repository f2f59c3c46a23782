"""What a bundle is, how one is checked, and how queue times fold into mergeable windows.

No I/O here: the ingest tier checks bundles with ``parse_bundle``, the aggregator
folds them with ``fold``, and both are unit-tested without a server.

A window keeps a histogram rather than the samples: buckets grow by 2 % of the
value, so windows from different passes merge by adding counts, and a
percentile read back from one is within about 1 % of the exact one (``max`` is
exact).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The largest request body the ingest tier reads, in bytes.
MAX_BODY = 256 * 1024
#: The most samples one bundle may carry.
MAX_SAMPLES = 1000
#: The largest queue time a sample may report, in milliseconds (one day).
MAX_QUEUE_MS = 86_400_000.0
#: How old a sample may be when it arrives (seconds); older ones would land in pruned windows.
MAX_AGE = 3600.0
#: How far ahead of the server's clock a sample's time may be (seconds).
MAX_AHEAD = 300.0
SOURCES = ("web", "worker")
_APP = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: Window widths, in seconds: what the aggregator writes, and what the roll-up makes of it.
WINDOW = 10
ROLLUP = 60
#: Bundles are spread over this many slots by their app's name; aggregator partition p of N
#: drains the slots s with s % N == p, so N must divide SLOTS for an even spread.
SLOTS = 64
#: Growth factor of the histogram's buckets.
GROWTH = 1.02
_LOG_GROWTH = math.log(GROWTH)


class BadBundle(ValueError):
    """A bundle that must be refused: ``field`` names where (``samples[3].t``), ``status`` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class Bundle:
    """One accepted POST: an application's queue-time samples, ``(t, queue_ms)`` pairs."""

    app: str
    source: str
    samples: tuple[tuple[float, float], ...]

    @property
    def slot(self) -> int:
        return slot_of(self.app)

    def samples_json(self) -> str:
        return json.dumps(self.samples, separators=(",", ":"))


def slot_of(app: str) -> int:
    """The slot an application's bundles go to: the same on every host and every run."""
    return zlib.crc32(app.encode()) % SLOTS


def slots_of(partition: int, partitions: int) -> list[int]:
    """The slots aggregator partition ``partition`` of ``partitions`` drains."""
    return [s for s in range(SLOTS) if s % partitions == partition]


def partition_of(app: str, partitions: int) -> int:
    return slot_of(app) % partitions


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadBundle(where, f"must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise BadBundle(where, "must be a finite number")
    return number


def parse_bundle(raw: bytes, now: float) -> Bundle:
    """The bundle in a request body, or ``BadBundle`` naming the first field that is wrong."""
    if len(raw) > MAX_BODY:
        raise BadBundle("body", f"is {len(raw)} bytes; at most {MAX_BODY} are taken", 413)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBundle("body", f"is not JSON ({exc})", 400) from None
    if not isinstance(doc, dict):
        raise BadBundle("body", f"must be a JSON object, not {type(doc).__name__}")
    for name in ("app", "source", "samples"):
        if name not in doc:
            raise BadBundle(name, "is missing")
    unknown = sorted(set(doc) - {"app", "source", "samples"})
    if unknown:
        raise BadBundle(unknown[0], "is not a field of a bundle (app, source, samples)")
    app, source, samples = doc["app"], doc["source"], doc["samples"]
    if not isinstance(app, str) or not _APP.match(app):
        raise BadBundle("app", "must be 1 to 64 letters, digits, '_', '.' or '-'")
    if source not in SOURCES:
        raise BadBundle("source", f"must be one of {', '.join(SOURCES)}, not {source!r}")
    if not isinstance(samples, list):
        raise BadBundle("samples", f"must be a list, not {type(samples).__name__}")
    if not samples:
        raise BadBundle("samples", "is empty; send at least one sample")
    if len(samples) > MAX_SAMPLES:
        raise BadBundle("samples", f"holds {len(samples)} samples; at most {MAX_SAMPLES} are taken", 413)
    parsed = []
    oldest, newest = now - MAX_AGE, now + MAX_AHEAD
    for i, sample in enumerate(samples):
        # The common case, a well-formed sample, checked in a few comparisons (NaN and the
        # infinities fail them); any other goes the long way, which names what is wrong.
        if type(sample) is dict and len(sample) == 2:
            t, ms = sample.get("t"), sample.get("queue_ms")
            if (type(t) is float or type(t) is int) and (type(ms) is float or type(ms) is int) \
                    and oldest <= t <= newest and 0 <= ms <= MAX_QUEUE_MS:
                parsed.append((float(t), float(ms)))
                continue
        parsed.append(_sample(sample, i, now))
    return Bundle(app, source, tuple(parsed))


def _sample(sample: object, i: int, now: float) -> tuple[float, float]:
    """One sample, or ``BadBundle`` naming its first wrong field."""
    where = f"samples[{i}]"
    if not isinstance(sample, dict):
        raise BadBundle(where, "must be an object {\"t\": ..., \"queue_ms\": ...}")
    extra = sorted(set(sample) - {"t", "queue_ms"})
    if extra:
        raise BadBundle(f"{where}.{extra[0]}", "is not a field of a sample (t, queue_ms)")
    for name in ("t", "queue_ms"):
        if name not in sample:
            raise BadBundle(f"{where}.{name}", "is missing")
    t = _number(sample["t"], f"{where}.t")
    if t < now - MAX_AGE:
        raise BadBundle(f"{where}.t", f"is {now - t:.0f}s old; samples older than {MAX_AGE:.0f}s "
                                      "are not taken")
    if t > now + MAX_AHEAD:
        raise BadBundle(f"{where}.t", f"is {t - now:.0f}s in the future (is the sender's clock right?)")
    ms = _number(sample["queue_ms"], f"{where}.queue_ms")
    if not 0 <= ms <= MAX_QUEUE_MS:
        raise BadBundle(f"{where}.queue_ms", f"must be from 0 to {MAX_QUEUE_MS:.0f}")
    return t, ms


# -- windows --------------------------------------------------------------------------------


def bucket_of(ms: float) -> int:
    return int(math.log1p(ms) / _LOG_GROWTH)


def bucket_value(bucket: int) -> float:
    """The middle of a bucket, in milliseconds."""
    return float(math.expm1((bucket + 0.5) * _LOG_GROWTH))


@dataclass
class Window:
    """The queue times of one application in one window: count, exact max, and a histogram."""

    count: int = 0
    max: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)

    def add(self, ms: float) -> None:
        self.count += 1
        if ms > self.max:
            self.max = ms
        b = bucket_of(ms)
        self.buckets[b] = self.buckets.get(b, 0) + 1

    def merge(self, other: Window) -> None:
        self.count += other.count
        self.max = max(self.max, other.max)
        for b, n in other.buckets.items():
            self.buckets[b] = self.buckets.get(b, 0) + n

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (within a bucket's width), at most ``max``."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return min(bucket_value(b), self.max)
        return self.max

    def encode(self) -> str:
        return json.dumps({str(b): n for b, n in sorted(self.buckets.items())}, separators=(",", ":"))

    @classmethod
    def decode(cls, count: int, max_ms: float, buckets: str) -> Window:
        return cls(count, max_ms, {int(b): n for b, n in json.loads(buckets).items()})

    def summary(self) -> dict[str, float | int]:
        return {"count": self.count, "p50": round(self.quantile(0.5), 3),
                "p95": round(self.quantile(0.95), 3), "p99": round(self.quantile(0.99), 3),
                "max": round(self.max, 3)}


def window_start(t: float, width: int = WINDOW) -> int:
    return int(t // width) * width


@dataclass
class Fold:
    """What one pass makes of its bundles: windows by ``(app, start)`` and per-app totals."""

    windows: dict[tuple[str, int], Window] = field(default_factory=dict)
    bundles: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)


def fold(bundles: Iterable[tuple[str, Iterable[Any]]]) -> Fold:
    """Fold ``(app, samples)`` pairs (samples as ``[t, queue_ms]``) into 10-second windows."""
    out = Fold()
    for app, samples in bundles:
        out.bundles[app] = out.bundles.get(app, 0) + 1
        n = 0
        for t, ms in samples:
            key = (app, window_start(t))
            window = out.windows.get(key)
            if window is None:
                window = out.windows[key] = Window()
            window.add(ms)
            n += 1
        out.samples[app] = out.samples.get(app, 0) + n
    return out


def merged(windows: Iterable[Window]) -> Window:
    total = Window()
    for window in windows:
        total.merge(window)
    return total


def quantiles(values: Mapping[int, int], count: int) -> tuple[float, float]:
    """p50 and p99 of a histogram of seconds-as-buckets (lags), for the stats page."""
    window = Window(count, 0.0, dict(values))
    window.max = max((bucket_value(b) for b in values), default=0.0)
    return window.quantile(0.5), window.quantile(0.99)
