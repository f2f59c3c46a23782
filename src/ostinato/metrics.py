"""Prometheus metrics and a health probe for one runner process: ``ostinato run --metrics-port``.

Nothing is counted twice and nothing is added to the pass path: a custom
collector reads the runner's keepers and ``StatsBook``s when Prometheus
scrapes, so a pass costs what it cost before. The HTTP server runs in a thread
of its own, so a scrape never waits on the event loop.

Served paths:

``/metrics``
    The Prometheus text format (OpenMetrics when asked for).
``/healthz``
    ``200`` while the runner is running and, for every loop whose lease it
    holds, the lease is still valid on the local monotonic clock (the renewer
    keeps extending it; a failed renewal ends it at once) and the loop is neither
    stalled (no finished pass within ``stall_after``) nor failing (its last
    ``fail_after`` passes all failed). Otherwise ``503``.
    A standby runner holding no lease is healthy. The body is JSON:
    ``{"ok": bool, "runner": "host:pid", "problems": [...], "held": [...]}``.

Every other path is ``404``, so a mistyped scrape target fails loudly instead
of scraping metrics from a path nobody meant.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from ostinato.errors import ConfigurationError, MissingExtraError
from ostinato.stats import BUCKETS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ostinato.keeper import LoopKeeper
    from ostinato.runner import Runner

log = logging.getLogger("ostinato.metrics")

#: The port ``--metrics-port`` is usually given (the OpenTelemetry Prometheus exporter's).
DEFAULT_PORT = 9464


def require() -> None:
    """Raise ``MissingExtraError`` unless ``prometheus-client`` is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingExtraError("--metrics-port", "metrics") from None


def _labels(keeper: LoopKeeper) -> list[str]:
    """``app``, ``loop`` and ``member``: a partition or key of a loop (``#3``, ``[acme]``) is
    labelled with its loop's name and itself, so ``sum by (loop)`` adds its members up;
    any other loop's ``member`` is empty."""
    app, loop = keeper.runner.app_name, keeper.spec.name
    return [app, loop, keeper.key[len(app) + 1 + len(loop):]]


class RunnerCollector:
    """Reads a runner's loops at scrape time and yields them as Prometheus metrics."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.started = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        now = time.monotonic()
        labels = ["app", "loop", "member"]
        passes = CounterMetricFamily(
            "ostinato_passes", "Passes finished by this runner, by outcome (worked, idle, failed).",
            labels=[*labels, "outcome"],
        )
        duration = HistogramMetricFamily(
            "ostinato_pass_duration_seconds", "How long passes took, in seconds.", labels=labels
        )
        held = GaugeMetricFamily(
            "ostinato_lease_held", "1 while this runner holds the loop's lease, else 0.", labels=labels
        )
        acquired = CounterMetricFamily(
            "ostinato_lease_acquisitions", "Leases of the loop won by this runner.", labels=labels
        )
        lost = CounterMetricFamily(
            "ostinato_lease_losses",
            "Leases of the loop this runner lost (failed renewal, revoked, paused).", labels=labels,
        )
        fence = GaugeMetricFamily(
            "ostinato_fence", "Fence of the lease held here (absent while not held).", labels=labels
        )
        since = GaugeMetricFamily(
            "ostinato_seconds_since_last_pass",
            "Seconds since this runner last finished a pass of the loop "
            "(since metrics started, if it has finished none).", labels=labels,
        )
        stalled = GaugeMetricFamily(
            "ostinato_stalled", "1 while the loop, held here, has finished no pass within stall_after.",
            labels=labels,
        )
        failing = GaugeMetricFamily(
            "ostinato_failing", "1 while the loop, held here, has failed its last fail_after passes.",
            labels=labels,
        )
        for keeper in self.runner.keepers.values():
            values = _labels(keeper)
            stats = keeper.stats
            for outcome, count in list(stats.outcomes.items()):
                passes.add_metric([*values, outcome], count)
            counts = list(stats.buckets)
            cumulative, running = [], 0
            for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            duration.add_metric(values, cumulative, stats.duration_sum)
            lease = keeper.lease
            holding = lease is not None and lease.deadline > now
            held.add_metric(values, 1.0 if holding else 0.0)
            acquired.add_metric(values, keeper.acquisitions)
            lost.add_metric(values, keeper.losses)
            if lease is not None and holding:
                fence.add_metric(values, lease.fence)
            last_end = stats.last_end
            since.add_metric(values, max(0.0, now - (self.started if last_end is None else last_end)))
            stalled.add_metric(values, 1.0 if keeper.stalled and lease is not None else 0.0)
            failing.add_metric(values, 1.0 if keeper.failing and lease is not None else 0.0)
        yield from (passes, duration, held, acquired, lost, fence, since, stalled, failing)


class WorkCollector:
    """The runner's own work with the coordinator. It describes itself, so a scrape that
    names only its metrics (``/metrics?name[]=ostinato_lease_renewals_total``) does not
    read every loop."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        app = self.runner.app_name
        calls = CounterMetricFamily(
            "ostinato_coordinator_calls",
            "Calls this runner made to the coordinator, by kind (acquire: one batch of requests).",
            labels=["app", "call"],
        )
        for call, count in sorted(self.runner.calls.items()):
            calls.add_metric([app, call], count)
        renewals = CounterMetricFamily("ostinato_lease_renewals", "Leases this runner renewed.",
                                       labels=["app"])
        renewals.add_metric([app], self.runner.renewals)
        yield from (calls, renewals)


class JobsCollector:
    """What a Celery or RQ worker's links and keeper did for app ``app`` (``attach(...,
    metrics_port=)``), read at scrape time: ``links`` and ``chains`` return counts so far."""

    def __init__(
        self, app: str, links: Callable[[], Mapping[str, int]], chains: Callable[[], Mapping[str, int]]
    ) -> None:
        self.app, self.links, self.chains = app, links, chains

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        links = CounterMetricFamily(
            "ostinato_job_links",
            "Links and clock passes this worker's processes ended, by outcome: ran; stale (a "
            "duplicate, or of an older chain), held, paused, lost, early, skipped, unreachable.",
            labels=["app", "outcome"],
        )
        chains = CounterMetricFamily(
            "ostinato_chains_forged",
            "Chains this worker's keeper forged, by kind: forged (none ran), reforged (one broke), "
            "woken (a wake-up replaced the link waiting in the queue).", labels=["app", "kind"],
        )
        for outcome, count in self.links().items():
            links.add_metric([self.app, outcome], count)
        for kind in ("forged", "reforged", "woken"):
            chains.add_metric([self.app, kind], self.chains().get(kind, 0))
        yield from (links, chains)


def serve_jobs(collector: JobsCollector, host: str, port: int) -> WSGIServer:
    """Serve ``collector`` on ``http://host:port/metrics`` from a thread; stop it with
    ``shutdown()`` and ``server_close()``. A port in use is a ``ConfigurationError``."""
    require()
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                                 "pick another metrics_port") from None
    return server


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def health(runner: Runner, now: float | None = None) -> dict[str, Any]:
    """What ``/healthz`` answers: ``ok`` and, when not ok, the ``problems`` found."""
    if now is None:
        now = time.monotonic()
    problems: list[str] = []
    held: list[dict[str, Any]] = []
    if runner.stopping:
        problems.append("the runner is stopping")
    for key, keeper in runner.keepers.items():
        lease = keeper.lease
        if lease is None:
            continue
        held.append({"loop": key, "fence": lease.fence, "stalled": keeper.stalled,
                     "failing": keeper.failing})
        if lease.deadline <= now:
            problems.append(f"{key}: lease lost or not renewed in time (fence {lease.fence})")
        if keeper.stalled:
            problems.append(f"{key}: stalled, no pass finished within {keeper.spec.stall_after}s")
        if keeper.failing:
            problems.append(f"{key}: failing, the last {keeper.stats.fail_streak} passes all failed "
                            f"(last error: {keeper.stats.last_error})")
    return {"ok": not problems, "runner": runner.info.label, "problems": problems, "held": held}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes are not worth a log line each."""


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` for ``runner`` on ``host:port`` from a thread."""

    def __init__(self, runner: Runner, host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> None:  # noqa: S104 - a scrape target must be reachable from Prometheus
        require()
        from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

        self.runner = runner
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RunnerCollector(runner))
        self.registry.register(WorkCollector(runner))
        ProcessCollector(registry=self.registry)
        self._metrics: WSGIApplication = make_wsgi_app(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application: ``/metrics``, ``/healthz``, and ``404`` on every other path."""
        path = environ.get("PATH_INFO")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            answer = health(self.runner)
            body = json.dumps(answer).encode()
            status = "200 OK" if answer["ok"] else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        body = b"not found: metrics are on /metrics, health on /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    def start(self) -> None:
        """Bind the port (a port in use is a ``ConfigurationError``) and serve from a thread."""
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)[0][0]
            server_class = _IPv6Server if family == socket.AF_INET6 else _Server
            self._server = make_server(self.host, self.port, self.app, server_class=server_class,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}; "
                "pick another --metrics-port"
            ) from None
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="ostinato-metrics",
                                        daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
