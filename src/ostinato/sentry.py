"""Sentry: errors of passes and of runners, and a cron monitor per loop.

::

    sentry_sdk.init(dsn=..., integrations=[ostinato.sentry.OstinatoIntegration()])

- Each pass runs in a Sentry isolation scope tagged ``ostinato.loop`` (the lease name,
  ``app:loop``), ``ostinato.fence``, ``ostinato.pass`` (the pass number) and
  ``ostinato.holder`` (``host:pid``), so an exception the pass raises, and anything
  the body captures itself, carries them. The failed pass's ERROR log line would
  report the same exception again, so that event is dropped.
- The runner's own ERROR lines (a coordinator out of reach, a pass over its timeout)
  reach Sentry through its logging integration; those that name a loop get the
  same tags.
- Every loop gets a cron monitor, its slug made from the lease name
  (``app:loop`` -> ``app-loop``), upserted from the loop's ``cron=`` (in its zone),
  ``every=`` or ``pause=``: see ``monitor_config``. A pass sends ``in_progress``
  when it starts and ``ok`` or ``error`` when it ends, throttled by ``Throttle``:
  at most one pair a minute per loop, plus, at once, the first failure after an
  ``ok``. A loop that stops or stalls misses its check-ins and Sentry says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ostinato import hooks
from ostinato.errors import MissingExtraError
from ostinato.hooks import PassOutcome

try:
    import sentry_sdk
    from sentry_sdk.crons import capture_checkin
    from sentry_sdk.integrations import Integration
    from sentry_sdk.scope import add_global_event_processor
except ImportError:
    raise MissingExtraError("ostinato.sentry", "sentry") from None

if TYPE_CHECKING:
    from sentry_sdk._types import Event, Hint, MonitorConfig

    from ostinato.loop import LoopSpec, Pass

__all__ = ["OstinatoIntegration", "Throttle", "monitor_config", "monitor_slug"]

#: A loop sends at most one check-in pair this often (seconds); see ``Throttle``.
CHECKIN_EVERY = 60.0
_SLUG_LENGTH = 50  # Sentry's limit on a monitor slug


def monitor_slug(lease_name: str) -> str:
    """The Sentry monitor slug of a loop: its lease name in lower case, every run of other
    characters than letters, digits, ``_`` and ``-`` made one ``-``; a name too long for
    Sentry's 50 characters is cut and ends in a hash of the whole, so two never clash."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", lease_name.lower()).strip("-")
    if len(slug) > _SLUG_LENGTH:
        digest = hashlib.sha256(lease_name.encode()).hexdigest()[:8]
        slug = f"{slug[:_SLUG_LENGTH - 9].rstrip('-')}-{digest}"
    return slug


def _minutes(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60))


def monitor_config(spec: LoopSpec) -> MonitorConfig:
    """The monitor Sentry upserts for a loop.

    - schedule: ``cron=`` as a crontab in the loop's zone (a seconds field is left out:
      Sentry's crontabs count minutes); ``every=`` as an interval of whole minutes
      (at least one: a faster loop checks in once a minute); ``pause=`` likewise,
      from its pause; a back-to-back loop every minute.
    - ``checkin_margin``: ``stall_after`` where given (a loop with no finished pass for
      that long is stalled, so a check-in that late is missed), else a minute plus the
      loop's longest idle and error backoffs, which delay passes on purpose.
    - ``max_runtime``: ``timeout`` where given, else ``stall_after``, else Sentry's default.
    - ``failure_issue_threshold``: ``fail_after``, as failing loops are counted.
    """
    pacing = spec.pacing
    config: MonitorConfig = {}
    if pacing.cron is not None:
        config["schedule"] = {"type": "crontab", "value": " ".join(pacing.cron.split()[:5])}
        config["timezone"] = pacing.timezone or "UTC"
    else:
        every = pacing.every if pacing.every is not None else (pacing.pause or 0.0)
        config["schedule"] = {"type": "interval", "value": _minutes(every), "unit": "minute"}
    if spec.stall_after is not None:
        config["checkin_margin"] = _minutes(spec.stall_after)
    else:
        config["checkin_margin"] = 1 + _minutes(pacing.idle[1] + pacing.error_backoff[1])
    runtime = spec.timeout if spec.timeout is not None else spec.stall_after
    if runtime is not None:
        config["max_runtime"] = _minutes(runtime)
    config["failure_issue_threshold"] = spec.fail_after
    return config


@dataclass
class Throttle:
    """Which passes of one loop send check-ins; pure, given the monotonic time.

    The first pass, and the first to start ``every`` seconds or more after the last
    reported one, sends a pair (``in_progress`` at its start, ``ok`` or ``error`` at its
    end). A pass that fails while the last check-in said ``ok`` sends ``error`` at once,
    inside the minute, and starts the minute again: a loop that turns bad shows as
    failed as soon as Sentry hears of it, and one that keeps failing, or keeps working,
    sends one pair a minute. So a loop sends at most two check-in pairs in any minute,
    one on average; a recovery is heard of within a minute.
    """

    every: float = CHECKIN_EVERY
    reported_at: float | None = None
    last_status: str | None = None

    def starts(self, now: float) -> bool:
        """Whether the pass starting ``now`` sends a pair (and counts as reported if so)."""
        if self.reported_at is None or now - self.reported_at >= self.every:
            self.reported_at = now
            return True
        return False

    def ended(self, now: float, *, reported: bool, failed: bool) -> str | None:
        """The status to send for a pass ending ``now``: its own for a reported pass, ``error``
        for the first failure after an ``ok``, else ``None`` (nothing to send)."""
        status = "error" if failed else "ok"
        if reported:
            self.last_status = status
            return status
        if failed and self.last_status == "ok":
            self.last_status, self.reported_at = status, now
            return status
        return None


class _Monitor:
    """One loop's check-ins in this process."""

    def __init__(self, slug: str, every: float) -> None:
        self.slug = slug
        self.throttle = Throttle(every)
        self.lock = threading.Lock()  # a loop handed back and forth runs in new threads


class OstinatoIntegration(Integration):
    """Report loops to Sentry: ``sentry_sdk.init(integrations=[OstinatoIntegration()])``.

    ``monitors=False``: no cron monitors, errors only. ``checkin_every``: the throttle's
    period in seconds (``Throttle``).
    """

    identifier = "ostinato"

    def __init__(self, *, monitors: bool = True, checkin_every: float = CHECKIN_EVERY) -> None:
        if isinstance(checkin_every, bool) or not isinstance(checkin_every, int | float) or not (
            checkin_every > 0
        ):
            raise ValueError(f"checkin_every must be a number of seconds > 0, not {checkin_every!r}")
        self.monitors = monitors
        self.checkin_every = float(checkin_every)
        self._monitors: dict[str, _Monitor] = {}
        self._lock = threading.Lock()

    @staticmethod
    def setup_once() -> None:
        hooks.add_around_pass(_around_pass)
        add_global_event_processor(_tag_runner_event)

    def monitor(self, lease_name: str) -> _Monitor:
        found = self._monitors.get(lease_name)
        if found is None:
            with self._lock:
                found = self._monitors.setdefault(
                    lease_name, _Monitor(monitor_slug(lease_name), self.checkin_every)
                )
        return found


def _integration() -> OstinatoIntegration | None:
    return sentry_sdk.get_client().get_integration(OstinatoIntegration)


def _reported(exc: BaseException) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        exc.__ostinato_sentry__ = True  # type: ignore[attr-defined]  # seen by _tag_runner_event


class _CheckIns:
    """The check-ins of one pass."""

    def __init__(self, integration: OstinatoIntegration, ctx: Pass) -> None:
        self.ctx = ctx
        self.monitor = integration.monitor(ctx.lease_name)
        self.began = time.monotonic()
        self.check_in_id: str | None = None
        with self.monitor.lock:
            self.reported = self.monitor.throttle.starts(self.began)
        if self.reported:
            self.check_in_id = self._send("in_progress", None)

    def end(self, *, failed: bool) -> None:
        end = time.monotonic()
        with self.monitor.lock:
            status = self.monitor.throttle.ended(end, reported=self.reported, failed=failed)
        if status is not None:
            self._send(status, end - self.began, self.check_in_id)

    def _send(self, status: str, duration: float | None, check_in_id: str | None = None) -> str | None:
        spec = hooks.declared(self.ctx)
        return capture_checkin(
            monitor_slug=self.monitor.slug, check_in_id=check_in_id, status=status,
            duration=duration, monitor_config=None if spec is None else monitor_config(spec),
        )


@contextlib.contextmanager
def _around_pass(ctx: Pass) -> Iterator[PassOutcome]:
    outcome = PassOutcome()
    integration = _integration()
    if integration is None:  # set up once per process, but this client may not want it
        yield outcome
        return
    checkins = _CheckIns(integration, ctx) if integration.monitors else None
    with sentry_sdk.isolation_scope() as scope:
        scope.set_tag("ostinato.loop", ctx.lease_name)
        scope.set_tag("ostinato.fence", ctx.fence)
        scope.set_tag("ostinato.pass", ctx.number)
        scope.set_tag("ostinato.holder", hooks.holder())
        if ctx.scheduled_for is not None:
            scope.set_tag("ostinato.scheduled_for", ctx.scheduled_for.isoformat())
        try:
            yield outcome
        except BaseException as exc:
            # A cancelled pass (timeout, lost lease) is no bug of the body's: the runner's
            # ERROR line reports it. It still counts as a failed pass for the monitor.
            if isinstance(exc, Exception):
                sentry_sdk.capture_exception(exc)
                _reported(exc)
            if checkins is not None:
                checkins.end(failed=True)
            raise
    if checkins is not None:
        checkins.end(failed=False)


def _tag_runner_event(event: Event, hint: Hint) -> Event | None:
    """Tag the runner's log events with their loop; drop a failed pass's line whose exception
    was reported from inside the pass already."""
    record = hint.get("log_record") if hint else None
    if record is None or not record.name.startswith("ostinato") or _integration() is None:
        return event
    exc_info: Any = hint.get("exc_info")
    if exc_info and getattr(exc_info[1], "__ostinato_sentry__", False):
        return None
    tags = event.setdefault("tags", {})
    loop, fence, runner = (getattr(record, name, None) for name in ("loop", "fence", "runner"))
    if loop is not None:
        tags.setdefault("ostinato.loop", loop)
    if fence is not None:
        tags.setdefault("ostinato.fence", str(fence))
    tags.setdefault("ostinato.holder", runner or hooks.holder())
    if (name := getattr(record, "event", None)) is not None:
        tags.setdefault("ostinato.event", name)
    return event
