"""Being watched: what ``ostinato run`` adds to a runner (a metrics server, a stall webhook),
and what ``ostinato status --check`` counts as unhealthy."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ostinato.metrics import MetricsServer
    from ostinato.notices import StallHook
    from ostinato.runner import Runner


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


#: How long a loop that no live runner declares must have been gone before
#: ``status --check`` stops counting it (``--retired-after``).
RETIRED_AFTER = 3600.0


def retired(
    rows: Sequence[Mapping[str, Any]], *, after: float = RETIRED_AFTER, now: float | None = None
) -> list[Mapping[str, Any]]:
    """The rows of loops that no live runner declares and that have been gone (no holder,
    nothing heard of them) for longer than ``after`` seconds: left behind by a deploy that
    removed them, not failing. ``ostinato forget`` removes them from status."""
    if now is None:
        now = time.time()
    return [
        row for row in rows
        if row["state"] == "no runner" and row.get("declared") is False
        and now - (row.get("last_seen") or 0.0) > after
    ]


def unhealthy(
    rows: Sequence[Mapping[str, Any]], *, retired_after: float = RETIRED_AFTER,
    now: float | None = None,
) -> list[str]:
    """Why ``status --check`` fails for these status rows (``control.status``); empty: healthy.

    A loop that is stalled, failing or has no runner fails it, and so does a coordinator
    that knows no loop at all (no runner has ever started). A loop that no live runner
    declares any more, gone for longer than ``retired_after``, is not counted (see
    ``retired``).
    """
    if not rows:
        return ["no loops are known: no runner has started"]
    gone = {id(row) for row in retired(rows, after=retired_after, now=now)}
    bad = [row for row in rows if row["state"] in UNHEALTHY and id(row) not in gone]
    # A loop made of partitions or keys is one line: how many of its members are in which state.
    members: dict[str, list[Mapping[str, Any]]] = {}
    problems = []
    for row in bad:
        if row.get("member"):
            members.setdefault(row["family"], []).append(row)
        else:
            problems.append(f"{row['app']}:{row['loop']} {UNHEALTHY[row['state']]}")
    for family, group in members.items():
        total = sum(1 for row in rows if row.get("family") == family and row.get("member"))
        states: dict[str, list[str]] = {}
        for row in group:
            states.setdefault(row["state"], []).append(row["member"])
        for state, names in states.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{family}: {len(names)} of {total} {UNHEALTHY[state]} ({shown})")
    return problems
