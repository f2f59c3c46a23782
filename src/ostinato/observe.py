"""Being watched: what ``ostinato run`` adds to a runner (a metrics server, a stall webhook),
and what ``ostinato status --check`` counts as unhealthy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ostinato.metrics import MetricsServer
    from ostinato.runner import Runner, StallHook


@dataclass(frozen=True)
class Observe:
    """``metrics_port``: serve ``/metrics`` and ``/healthz`` there; ``alert_webhook``: POST stalls there."""

    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # noqa: S104 - Prometheus and probes scrape from other hosts
    alert_webhook: str | None = None

    def check(self) -> None:
        """Fail now (missing extra, bad URL) rather than once the loops are running."""
        if self.metrics_port is not None:
            from ostinato.metrics import require

            require()
        self.hooks()

    def hooks(self) -> list[StallHook]:
        if self.alert_webhook is None:
            return []
        from ostinato.alerts import WebhookAlert

        return [WebhookAlert(self.alert_webhook)]

    def start(self, runner: Runner) -> MetricsServer | None:
        """Start serving metrics for ``runner``, if asked to; the caller stops the server."""
        if self.metrics_port is None:
            return None
        from ostinato.metrics import MetricsServer

        server = MetricsServer(runner, self.metrics_host, self.metrics_port)
        server.start()
        return server


#: Loop states that fail ``ostinato status --check``; ``paused`` is an operator's choice, not a fault.
UNHEALTHY = {"stalled": "is stalled", "failing": "is failing", "no runner": "has no runner"}


def unhealthy(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why ``status --check`` fails for these status rows (``control.status``); empty: healthy.

    A loop that is stalled, failing or has no runner fails it, and so does a coordinator
    that knows no loop at all (no runner has ever started).
    """
    if not rows:
        return ["no loops are known: no runner has started"]
    return [f"{row['app']}:{row['loop']} {UNHEALTHY[row['state']]}" for row in rows
            if row["state"] in UNHEALTHY]
