"""Stall and failing alerts sent to a webhook: ``ostinato run --alert-webhook URL``.

A ``WebhookAlert`` is a stall hook (``app.on_stall``): the runner calls it in a
worker thread once when a loop stalls or starts failing, and once when it
recovers. It POSTs one JSON object::

    {"status": "stalled" | "failing" | "recovered", "reason": "stalled" | "failing",
     "loop": "app:loop", "holder": "host:pid", "fence": 7,
     "last_pass": 1718000000.0 | null, "last_pass_iso": "2024-...Z" | null,
     "stalled_for": 61.2, "failed_passes": 3, "last_error": "ValueError: ..." | null,
     "text": "ostinato: app:loop stalled: ..."}

``text`` makes the body readable as-is by chat webhooks (Slack, Mattermost).
A failed POST is retried twice, then logged; it never raises into the runner.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from ostinato.errors import ConfigurationError
from ostinato.logs import fields
from ostinato.notices import Stall

log = logging.getLogger("ostinato.alerts")

#: Seconds to wait for the webhook to answer, per try.
TIMEOUT = 5.0
#: Tries per notice, a second apart, then the notice is given up (and logged).
TRIES = 3


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def payload(stall: Stall) -> dict[str, Any]:
    """The JSON body sent for ``stall``."""
    status = "recovered" if stall.recovered else stall.reason
    last = _iso(stall.last_pass_end) or "never"
    if stall.reason == "failing":
        if stall.recovered:
            text = (f"ostinato: {stall.loop} recovered: a pass succeeded after "
                    f"{stall.stalled_for:.1f}s of failing (holder {stall.holder}, fence {stall.fence})")
        else:
            text = (f"ostinato: {stall.loop} failing: the last {stall.failed_passes} passes all "
                    f"failed (holder {stall.holder}, fence {stall.fence}); last error: "
                    f"{stall.last_error}")
    elif stall.recovered:
        text = (f"ostinato: {stall.loop} recovered after a stall of {stall.stalled_for:.1f}s "
                f"(holder {stall.holder}, fence {stall.fence})")
    else:
        text = (f"ostinato: {stall.loop} stalled: no pass finished for {stall.stalled_for:.1f}s "
                f"(holder {stall.holder}, fence {stall.fence}, last pass ended {last})")
    return {
        "status": status,
        "reason": stall.reason,
        "loop": stall.loop,
        "holder": stall.holder,
        "fence": stall.fence,
        "last_pass": stall.last_pass_end,
        "last_pass_iso": _iso(stall.last_pass_end),
        "stalled_for": round(stall.stalled_for, 3),
        "failed_passes": stall.failed_passes,
        "last_error": stall.last_error,
        "text": text,
    }


class WebhookAlert:
    """A stall hook that POSTs each stall and recovery as JSON to ``url``."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT, tries: int = TRIES,
                 retry_after: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(  # the URL itself is not shown: it may hold a secret
                f"bad --alert-webhook (scheme {parts.scheme!r}): expected an http:// or https:// URL"
            )
        self.url = url
        self.timeout = timeout
        self.tries = max(1, tries)
        self.retry_after = retry_after
        #: Where the webhook is, fit to log: its path may hold a secret token.
        self.display = self._shown(url)

    @staticmethod
    def _shown(url: str) -> str:
        try:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}/..."
        except ValueError:
            return "<unparseable URL>"

    def __repr__(self) -> str:
        return f"<WebhookAlert {self.display}>"

    def __call__(self, stall: Stall) -> None:
        """POST the notice; runs in the hook's worker thread and never raises."""
        body = json.dumps(payload(stall)).encode()
        for attempt in range(1, self.tries + 1):
            try:
                self._post(body)
                return
            except Exception as exc:  # a broken webhook must never reach the runner
                why = exc
            if attempt < self.tries:
                time.sleep(self.retry_after)
        log.error("%s: stall alert to %s failed after %d tries: %s", stall.loop, self.display,
                  self.tries, why,
                  extra=fields("alert_failed", loop=stall.loop, fence=stall.fence, runner=stall.holder))

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "ostinato"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                response.read()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection open
            raise OSError(f"the webhook answered HTTP {exc.code} {exc.reason}") from None
