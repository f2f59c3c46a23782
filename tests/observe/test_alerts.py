"""Stall alerts: once per stall to the log, the webhook and ``status --check``, and a recovery notice."""

from __future__ import annotations

import logging
import time

import pytest

from ostinato.alerts import WebhookAlert, payload
from ostinato.errors import ConfigurationError
from ostinato.runner import Stall
from tests.observe.conftest import APP, Stack, Webhook, free_port, wait_for

STALL = Stall(loop="obs:blocker", holder="vm:42", fence=7, last_pass_end=1_700_000_000.0,
              stalled_for=61.25)


@pytest.mark.slow
def test_a_blocking_body_fires_one_stall_alert_and_one_recovery(stack: Stack, webhook: Webhook) -> None:
    """A body that blocks past stall_after is reported once (log, webhook, status) and recovers."""
    runner = stack.runner("--alert-webhook", webhook.url, "--log-format", "json")
    wait_for(lambda: stack.reported("obs:blocker"), what="blocker's first report")
    stack.gate.touch()  # the next pass of blocker blocks
    blocked_at = time.time()

    def stalled_in_status() -> bool:
        return stack.status()["obs:blocker"]["state"] == "stalled"

    wait_for(lambda: webhook.bodies, what=f"the stall webhook\n{runner.output()}")
    wait_for(stalled_in_status, what="status to show the stall")
    check = stack.cli("status", "--check")
    assert check.returncode == 1
    assert check.stderr.strip() == "ostinato: check failed: obs:blocker is stalled"

    stack.gate.unlink()
    wait_for(lambda: len(webhook.bodies) >= 2, what="the recovery webhook")
    wait_for(lambda: not stalled_in_status(), what="status to show the recovery")
    assert stack.cli("status", "--check").returncode == 0

    stalled, recovered = webhook.bodies  # exactly one of each: once per stall
    assert stalled["status"] == "stalled"
    assert stalled["loop"] == "obs:blocker"
    assert stalled["holder"].endswith(f":{runner.pid}")
    assert stalled["fence"] >= 1
    assert stalled["stalled_for"] > 1.0  # stall_after="1s"
    assert stalled["last_pass"] is not None
    assert stalled["last_pass"] <= blocked_at + 0.5
    assert "obs:blocker stalled" in stalled["text"]
    assert recovered["status"] == "recovered"
    assert recovered["loop"] == "obs:blocker"
    assert recovered["stalled_for"] >= stalled["stalled_for"]

    assert runner.stop() == 0
    events = [line for line in runner.json_lines() if line.get("loop") == "obs:blocker"]
    kinds = [line["event"] for line in events if line.get("event") in ("stalled", "recovered")]
    assert kinds == ["stalled", "recovered"]
    stall_line = next(line for line in events if line.get("event") == "stalled")
    assert stall_line["level"] == "error"
    assert stall_line["runner"].endswith(f":{runner.pid}")
    assert stall_line["fence"] == stalled["fence"]


def test_the_webhook_body_says_loop_holder_last_pass_and_how_long() -> None:
    """The JSON body of a stall notice carries the loop, holder, fence, last pass and duration."""
    body = payload(STALL)
    assert body == {
        "status": "stalled", "reason": "stalled", "loop": "obs:blocker", "holder": "vm:42",
        "fence": 7, "last_pass": 1_700_000_000.0, "last_pass_iso": "2023-11-14T22:13:20Z",
        "stalled_for": 61.25, "failed_passes": 0, "last_error": None,
        "text": "ostinato: obs:blocker stalled: no pass finished for 61.2s "
                "(holder vm:42, fence 7, last pass ended 2023-11-14T22:13:20Z)",
    }
    assert payload(Stall("a:b", "h:1", 1, None, 2.0, recovered=True))["status"] == "recovered"


def test_a_failing_webhook_is_retried_logged_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """A webhook answering 500 gets every try, then one ERROR line that hides the URL's path."""
    hook = Webhook(status=500)
    try:
        alert = WebhookAlert(hook.url, tries=3, retry_after=0.01)
        with caplog.at_level(logging.ERROR, logger="ostinato.alerts"):
            alert(STALL)  # must not raise
    finally:
        hook.close()
    assert len(hook.bodies) == 3
    [record] = caplog.records
    assert "stall alert to http://127.0.0.1:" in record.getMessage()
    assert "failed after 3 tries" in record.getMessage()
    assert "secret-token" not in record.getMessage()


def test_an_unreachable_webhook_times_out_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listening at the webhook: the hook returns after its tries and logs, never raises."""
    alert = WebhookAlert(f"http://127.0.0.1:{free_port()}/x", tries=2, retry_after=0.01, timeout=1)
    with caplog.at_level(logging.ERROR, logger="ostinato.alerts"):
        alert(STALL)
    assert "failed after 2 tries" in caplog.text


@pytest.mark.parametrize("url", ["ftp://example.invalid/x", "not a url", "file:///etc/passwd"])
def test_a_webhook_that_is_not_http_is_refused_at_once(url: str) -> None:
    """Only http:// and https:// webhooks are accepted, and the error says so."""
    with pytest.raises(ConfigurationError, match="expected an http:// or https:// URL"):
        WebhookAlert(url)


@pytest.mark.slow
def test_a_bad_alert_webhook_fails_the_run_command_in_one_line(stack: Stack) -> None:
    """ostinato run --alert-webhook with a bad URL exits 2 before running any loop."""
    result = stack.cli("run", APP, "--alert-webhook", "mailto:x@y")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ostinato: error: bad --alert-webhook (scheme 'mailto'): expected an http:// or https:// URL"
    )
