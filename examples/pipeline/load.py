"""An open-loop load generator: POST bundles at a steady rate, whatever the server does.

Request ``i`` is due at ``start + i / rate``, and is sent then on an idle
keep-alive connection, or a new one (up to ``connections``) when all are busy.
Its latency is counted from when it was due, not from when it went out, so a
slow server shows as latency, never as a lower rate (no coordinated omission).
The HTTP/1.1 client is a few lines over asyncio streams: a general client
would cost more CPU than the server under test at 5,000 requests a second.

It prints one JSON summary: ``sent``, ``accepted`` (202), ``samples_accepted``,
``rejected`` (any other answer), ``errors`` (the connection failed), ``unanswered``
(still waiting 30 s after the last one was sent), ``latency_ms``
(``p50``, ``p99``, ``max``, from when each request was due), ``late_ms`` (how late
the generator itself started each request: when it is not small, the generator did not
get the CPU on time and ``latency_ms`` holds that wait too), ``from_write_ms`` (latency
from the request's write, which leaves out that wait and any wait for a free
connection when all ``connections`` are busy) and ``behind_ms`` (the most the sending
loop fell behind its schedule). Times are read from ``time.perf_counter()``,
not the event loop's clock, which counts whole milliseconds under uvloop.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Tally:
    sent: int = 0
    accepted: int = 0
    samples_accepted: int = 0
    rejected: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    from_write: list[float] = field(default_factory=list)
    behind: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self, seconds: float, rate: float) -> dict[str, Any]:
        def spread(values: list[float]) -> dict[str, float]:
            ordered = sorted(values)

            def pick(q: float) -> float:
                if not ordered:
                    return 0.0
                rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
                return round(ordered[rank] * 1000, 3)

            return {"p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0)}

        return {
            "sent": self.sent, "accepted": self.accepted, "samples_accepted": self.samples_accepted,
            "rejected": self.rejected, "errors": self.errors,
            "unanswered": self.sent - self.accepted - self.rejected - self.errors,
            "latency_ms": spread(self.latencies), "late_ms": spread(self.late),
            "from_write_ms": spread(self.from_write),
            "behind_ms": round(self.behind * 1000, 3), "rate": rate, "seconds": round(seconds, 3),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


def make_bundle(rng: random.Random, apps: int, now: float) -> tuple[bytes, int]:
    """A bundle as an application would send it: 1 to 20 samples of the last second; its size.

    Written out by hand rather than by ``json.dumps``: at 1,000 bundles a second the
    generator shares the machine with the server it measures, and this is a third of the cost."""
    app = f"app-{rng.randrange(apps):03d}"
    n = rng.randint(1, 20)
    samples = ",".join(f'{{"t":{now - rng.random():.3f},"queue_ms":{rng.lognormvariate(2.5, 1.0):.2f}}}'
                       for _ in range(n))
    source = rng.choice(("web", "worker"))
    return f'{{"app":"{app}","source":"{source}","samples":[{samples}]}}'.encode(), n


class Client:
    """Keep-alive connections to one server, each carrying one request at a time."""

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path.rstrip("/") or "") + "/v1/metrics"
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(connections)
        self.open = 0

    async def post(self, body: bytes) -> tuple[int, float]:
        """The answer's status, and when the request was written (``time.perf_counter()``)."""
        async with self.slots:
            conn = self.idle.pop() if self.idle else None
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
                self.open += 1
            reader, writer = conn
            try:
                written = time.perf_counter()
                writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (self.path.encode(), self.host.encode(), len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                keep = True
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        keep = False
                await reader.readexactly(length)
            except BaseException:
                writer.close()
                self.open -= 1
                raise
            if keep:
                self.idle.append(conn)
            else:
                writer.close()
                self.open -= 1
            return status, written

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def run(url: str, rate: float, seconds: float, apps: int = 20, connections: int = 256,
              seed: int | None = None, stop: asyncio.Event | None = None) -> dict[str, Any]:
    """Send ``rate`` bundles a second for ``seconds`` (or until ``stop`` is set); the summary."""
    rng = random.Random(seed)
    client = Client(url, connections)
    tally = Tally()
    pending: set[asyncio.Task[None]] = set()

    async def one(body: bytes, n: int, due: float) -> None:
        tally.late.append(max(0.0, time.perf_counter() - due))
        try:
            status, written = await client.post(body)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            tally.errors += 1
            return
        answered = time.perf_counter()
        tally.latencies.append(answered - due)
        tally.from_write.append(answered - written)
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if status == 202:
            tally.accepted += 1
            tally.samples_accepted += n
        else:
            tally.rejected += 1

    # Everything made so far lives to the end: a full collection need not look at it again.
    gc.freeze()
    start = time.perf_counter() + 0.05
    total = math.inf if seconds <= 0 else int(rate * seconds)
    i = 0
    while i < total and not (stop is not None and stop.is_set()):
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            tally.behind = max(tally.behind, now - due)
        body, n = make_bundle(rng, apps, time.time())
        task = asyncio.create_task(one(body, n, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        tally.sent += 1
        i += 1
    if pending:
        await asyncio.wait(pending, timeout=30)
    client.close()
    return tally.summary(time.perf_counter() - start, rate)
