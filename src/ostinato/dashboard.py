"""``ostinato dashboard``: a live web page of every loop of every app in a coordinator.

The dashboard process samples the coordinator's ``loops()`` every few seconds
and keeps the last hour of samples per loop in memory (a ring), from which it
derives passes per minute, the error rate and the one-hour charts; the
coordinator is not changed for it.

Passes per minute are counted over the last minute the dashboard watched and
divided by the time actually watched. Until it has watched a full minute, a
rate is given only once ``MIN_PASSES`` passes were counted: one pass of a
once-a-minute cron loop seen in the first 20 seconds says nothing about its
rate, so the page shows ``—`` rather than 3 a minute. Each point of the rate
chart is the same measure taken at that moment, so the chart's latest point is
the number in the table. The page (``dashboard_static/``, no build
step, no CDN) polls ``api/loops`` and redraws in place.

Pause, resume, wake and release are POSTs to ``api/loops/{key}/{action}``
carrying ``Authorization: Bearer <token>``; with no ``--token`` the page is
read-only and those POSTs are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import signal
import socket
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ostinato import control
from ostinato.coordinators import Coordinator, LoopRecord, from_url
from ostinato.errors import ConfigurationError, MissingExtraError, OstinatoError, UnknownLoopError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("ostinato.dashboard")

STATIC = Path(__file__).with_name("dashboard_static")
#: How often the coordinator is sampled, by default.
SAMPLE_EVERY = 2.0
#: How far back the charts go.
HISTORY = 3600.0
#: Chart resolution over a full hour: samples are merged into slots of this many seconds.
SLOT = 20.0
#: Passes per minute and the error rate are measured over this window.
RATE_WINDOW = 60.0
#: Rates over less history than this are not shown (runners report about once a second).
MIN_SPAN = 5.0
#: Passes per minute over less than a full window are shown only once this many were counted.
MIN_PASSES = 10

#: At most this many members of an expanded loop made of partitions or keys are listed.
MEMBERS_SHOWN = 500

#: The page's buttons; ``release`` (``control.release``) is the fourth.
ACTIONS: dict[str, Callable[[Coordinator, str], Awaitable[str]]] = {
    "pause": control.pause,
    "resume": control.resume,
    "wake": control.wake,
}


def require() -> None:
    """Raise ``MissingExtraError`` unless Starlette and uvicorn are installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingExtraError("ostinato dashboard", "dashboard") from None


@dataclass(frozen=True)
class Sample:
    """One loop's counters as the coordinator gave them at wall-clock time ``at``."""

    at: float
    passes: int
    errors: int
    last_duration: float | None


class History:
    """The last hour of samples of every loop, and the rates and chart series drawn from them."""

    def __init__(self, every: float = SAMPLE_EVERY) -> None:
        self.every = every
        self.rings: dict[str, deque[Sample]] = {}
        # Each chart point needs the minute before it too, for its passes per minute.
        self._size = math.ceil((HISTORY + RATE_WINDOW) / every) + 2

    def add(self, at: float, records: list[LoopRecord]) -> None:
        for record in records:
            ring = self.rings.setdefault(record.key, deque(maxlen=self._size))
            ring.append(Sample(at, record.passes, record.errors, record.last_duration))

    def rates(self, key: str, window: float = RATE_WINDOW) -> tuple[float | None, float | None]:
        """Passes per minute and errors per pass over the last ``window`` seconds (``None``: unknown)."""
        ring = self.rings.get(key)
        if not ring:
            return None, None
        samples = list(ring)
        return self._rates(samples, [s.at for s in samples], len(samples) - 1, window)

    def _rates(self, samples: list[Sample], times: list[float], end: int,
               window: float) -> tuple[float | None, float | None]:
        """``rates`` as they stood at ``samples[end]``."""
        if end < 1:
            return None, None
        last = samples[end]
        start = min(bisect_left(times, last.at - window - self.every / 2, 0, end), end - 1)
        first = samples[start]
        elapsed = last.at - first.at
        if elapsed < max(MIN_SPAN, 2 * self.every):
            return None, None  # runners report about once a second: too short to say
        passes = max(0, last.passes - first.passes)
        errors = max(0, last.errors - first.errors)
        error_rate = min(1.0, errors / passes) if passes else None
        if elapsed < window - self.every and passes < MIN_PASSES:
            return None, error_rate  # too few passes seen to tell a rate from a coincidence
        return passes / elapsed * 60, error_rate

    def series(self, key: str, now: float) -> list[dict[str, float | None]]:
        """Chart points over the last hour: seconds ``ago``, passes per minute (as ``rates``
        gives them at that point), and the mean pass duration within the point's slot."""
        ring = self.rings.get(key)
        if not ring:
            return []
        samples = list(ring)
        times = [s.at for s in samples]
        # Finer slots while there is little history, so a fresh dashboard draws lines, not a dot.
        span = min(HISTORY, now - samples[0].at)
        width = max(self.every, min(SLOT, span / 90))
        durations: dict[int, list[float]] = {}  # slot -> the durations sampled in it
        ends: dict[int, int] = {}  # slot -> index of its last sample
        for index, sample in enumerate(samples):
            if sample.at < now - HISTORY:
                continue
            slot = int(sample.at // width)
            durations.setdefault(slot, [])
            if sample.last_duration is not None:
                durations[slot].append(sample.last_duration)
            ends[slot] = index
        points: list[dict[str, float | None]] = []
        for slot, end in ends.items():
            sampled = durations[slot]
            points.append({
                "ago": round(now - samples[end].at, 3),
                "per_minute": self._rates(samples, times, end, RATE_WINDOW)[0],
                "duration": sum(sampled) / len(sampled) if sampled else None,
            })
        return points


class Board:
    """The dashboard's state: the coordinator, the latest records and their history."""

    def __init__(self, url: str, *, token: str | None = None, every: float = SAMPLE_EVERY,
                 coordinator: Coordinator | None = None) -> None:
        """Watch the coordinator at ``url``, or ``coordinator`` itself when given."""
        self.coordinator = coordinator if coordinator is not None else from_url(url)
        self.token = token or None
        self.every = every
        self.history = History(every)
        self.records: list[LoopRecord] = []
        self.sampled_at: float | None = None
        self.error: str | None = None
        self._opened = False
        self._lock = asyncio.Lock()

    async def sample(self) -> None:
        """Read every loop from the coordinator once; an outage is shown, not raised."""
        async with self._lock:
            try:
                if not self._opened:
                    await self.coordinator.open()
                    self._opened = True
                records = await control.listed(self.coordinator, await self.coordinator.loops())
            except OstinatoError as exc:
                if self.error is None:
                    log.error("cannot read the coordinator, will retry: %s", exc)
                self.error = f"cannot read the coordinator: {exc}"
                return
            if self.error is not None:
                log.warning("reading the coordinator again")
            now = time.time()
            self.records, self.sampled_at, self.error = records, now, None
            self.history.add(now, records)

    async def sample_forever(self) -> None:
        while True:
            started = time.monotonic()
            await self.sample()
            await asyncio.sleep(max(0.05, self.every - (time.monotonic() - started)))

    def snapshot(self, expand: Collection[str] = ()) -> dict[str, Any]:
        """What ``api/loops`` answers: a loop made of partitions or keys is one entry with
        ``group`` set, followed by its members (``parent`` set, at most ``MEMBERS_SHOWN``)
        when it is in ``expand``."""
        now = time.time()
        rows = []
        for record in self.records:
            row = control.describe(record, now)
            per_minute, error_rate = self.history.rates(record.key)
            row.update(key=record.key, per_minute=per_minute, error_rate=error_rate,
                       held_since=record.held_since, series=self.history.series(record.key, now))
            rows.append(row)
        loops: list[dict[str, Any]] = []
        for own, members in control.group(rows):
            if not members:
                loops.append(own or {})
                continue
            family = members[0]["family"]
            opened = family in expand
            loops.append(_family_row(family, own, members, expanded=opened))
            if opened:
                loops.extend({**row, "parent": family} for row in members[:MEMBERS_SHOWN])
        return {
            "coordinator": self.coordinator.display_url,
            "control": self.token is not None,
            "now": now,
            "sampled_at": self.sampled_at,
            "every": self.every,
            "history": HISTORY,
            "rate_window": RATE_WINDOW,
            "min_passes": MIN_PASSES,
            "error": self.error,
            "loops": loops,
        }

    def authorized(self, header: str) -> bool:
        if self.token is None:
            return False
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self.token.encode())

    async def act(self, action: str, key: str) -> dict[str, Any]:
        """Run a control action on loop ``key``, then sample at once so the page shows it."""
        answer: dict[str, Any] = {"ok": True, "action": action}
        if action == "release":
            answer["loop"], answer["fence"] = await control.release(self.coordinator, key)
        else:
            answer["loop"] = await ACTIONS[action](self.coordinator, key)
        log.info("dashboard: %s %s", action, answer["loop"])
        await self.sample()
        return answer


def _family_row(family: str, own: dict[str, Any] | None, members: list[dict[str, Any]], *,
                expanded: bool) -> dict[str, Any]:
    """One entry for a loop made of members: their states counted, their numbers added up."""
    kind = "partitions" if members[0]["member"].startswith("#") else "keys"
    states: dict[str, int] = {}
    for row in members:
        states[row["state"]] = states.get(row["state"], 0) + 1
    order = ("failing", "stalled", "no runner", "paused", "running", "idle")
    worst = next((state for state in order if state in states), members[0]["state"])
    summary = ", ".join(f"{states[state]} {state}" for state in order if state in states)
    if own is not None and own["state"] in ("failing", "stalled"):
        worst, summary = own["state"], f"key source {own['state']}; {summary}"
    holders = {row["holder"] for row in members if row["holder"]}
    rates = [row["per_minute"] for row in members if row["per_minute"] is not None]
    errors = [(row["error_rate"], row["per_minute"] or 0.0) for row in members
              if row["error_rate"] is not None]
    weight = sum(w for _, w in errors)
    failed = max((row for row in members if row["last_error"]), default=None,
                 key=lambda row: row["last_error_at"] or 0.0)
    app, _, loop = family.partition(":")
    return {
        "key": family, "app": app, "loop": loop, "family": family, "member": None,
        "group": {"kind": kind, "count": len(members), "shown": min(len(members), MEMBERS_SHOWN),
                  "states": states},
        "expanded": expanded, "state": worst, "summary": summary,
        "holder": next(iter(holders)) if len(holders) == 1 else f"{len(holders)} runners",
        "fence": None, "passes": sum(row["passes"] for row in members),
        "errors": sum(row["errors"] for row in members),
        "per_minute": sum(rates) if rates else None,
        "error_rate": (sum(r * w for r, w in errors) / weight if weight else errors[0][0])
        if errors else None,
        "last_error": failed["last_error"] if failed else None,
        "last_error_at": failed["last_error_at"] if failed else None,
        "p50": max((row["p50"] for row in members if row["p50"] is not None), default=None),
        "p99": max((row["p99"] for row in members if row["p99"] is not None), default=None),
        "next_start": None, "next_start_iso": None, "zone": None,
        "series": _merged([row["series"] for row in members]),
    }


def _merged(series: list[list[dict[str, float | None]]]) -> list[dict[str, float | None]]:
    """Members' chart points added up per moment: passes per minute summed, the slowest mean
    duration kept (every member is sampled at the same moments)."""
    points: dict[float, dict[str, float | None]] = {}
    for points_of_one in series:
        for point in points_of_one:
            at = round(point["ago"] or 0.0)
            merged = points.setdefault(at, {"ago": point["ago"], "per_minute": None, "duration": None})
            rate, duration = point["per_minute"], point["duration"]
            if rate is not None:
                merged["per_minute"] = rate + (merged["per_minute"] or 0.0)
            if duration is not None:
                merged["duration"] = max(duration, merged["duration"] or 0.0)
    return sorted(points.values(), key=lambda p: -(p["ago"] or 0.0))


def create_app(board: Board) -> Starlette:
    """The Starlette application serving the page, its assets and its small JSON API."""
    require()
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
        "X-Content-Type-Options": "nosniff",
    }

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=headers)

    async def loops(request: Request) -> Response:
        expand = request.query_params.getlist("expand")
        return JSONResponse(board.snapshot(expand), headers=headers)

    async def act(request: Request) -> Response:
        action, key = request.path_params["action"], request.path_params["key"]
        if action not in ACTIONS and action != "release":
            return JSONResponse({"error": f"unknown action {action!r}"}, 404)
        if board.token is None:
            return JSONResponse({"error": "read-only: start the dashboard with --token to allow this"},
                                403)
        if not board.authorized(request.headers.get("authorization", "")):
            return JSONResponse({"error": "wrong or missing token"}, 401)
        try:
            return JSONResponse(await board.act(action, key), headers=headers)
        except UnknownLoopError as exc:
            return JSONResponse({"error": str(exc)}, 404)
        except OstinatoError as exc:
            return JSONResponse({"error": str(exc)}, 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sampler = asyncio.create_task(board.sample_forever(), name="ostinato-dashboard-sampler")
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await board.coordinator.close()

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/loops", loops),
            Route("/api/loops/{key}/{action}", act, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``0``: any free port); a port in use is a clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}; pick another --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(board: Board, sock: socket.socket) -> None:
    """Serve the dashboard on ``sock`` until SIGINT or SIGTERM."""
    require()
    import uvicorn

    config = uvicorn.Config(create_app(board), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, lifespan="on")
    server = uvicorn.Server(config)

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    # uvicorn shuts down on SIGTERM/SIGINT, then raises the signal again under the
    # handlers it found: these make that a clean exit 0 (not a traceback), and stop
    # a server that is signalled before it has installed its own.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    server.run(sockets=[sock])


def page_html(head: str = "") -> str:
    """The page's HTML with ``head`` added at the end of its ``<head>``: a host that serves
    the page itself (the Django mount) adds its own tags there. The page's addresses are
    relative (``api/loops``, ``static/...``), so it works under any prefix ending in ``/``."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return html.replace("</head>", f"{head}</head>", 1)
