"""``ostinato run --metrics-port``: Prometheus metrics and /healthz from a real runner process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.metrics import MetricsServer
from ostinato.runner import Runner
from ostinato.stats import BUCKETS
from tests.observe.conftest import APP, Stack, free_port, get, wait_for

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample on ``/metrics``, parsed by prometheus_client's own parser."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, loop: str, **labels: str) -> float | None:
    return samples.get((name, frozenset({"app": "obs", "loop": loop, "member": "", **labels}.items())))


def test_metrics_scraped_and_parsed_match_the_runner(stack: Stack) -> None:
    """Passes by outcome, the duration histogram, lease, fence, last pass and stall read back right."""
    port = free_port()
    runner = stack.runner("--metrics-port", str(port), "--metrics-host", "127.0.0.1")

    def ready() -> Samples | None:
        try:
            samples = scrape(port)
        except OSError:
            return None
        failed = value(samples, "ostinato_passes_total", "flaky", outcome="failed") or 0
        worked = value(samples, "ostinato_passes_total", "tick", outcome="worked") or 0
        return samples if failed >= 2 and worked >= 10 else None

    samples = wait_for(ready, what=f"passes in the metrics\n{runner.output()}")
    for loop in ("tick", "flaky", "blocker"):
        passes = sum(value(samples, "ostinato_passes_total", loop, outcome=o) or 0
                     for o in ("worked", "idle", "failed"))
        buckets = [value(samples, "ostinato_pass_duration_seconds_bucket", loop, le=le)
                   for le in [*(repr(b) for b in BUCKETS), "+Inf"]]
        assert None not in buckets
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] == passes == value(samples, "ostinato_pass_duration_seconds_count", loop)
        assert (value(samples, "ostinato_pass_duration_seconds_sum", loop) or 0) > 0
        assert value(samples, "ostinato_lease_held", loop) == 1
        assert value(samples, "ostinato_lease_acquisitions_total", loop) == 1
        assert value(samples, "ostinato_lease_losses_total", loop) == 0
        assert value(samples, "ostinato_stalled", loop) == 0
        assert 0 <= (value(samples, "ostinato_seconds_since_last_pass", loop) or -1) < 5
    # tick sleeps 2 ms a pass: its passes sit in the buckets above 2 ms
    assert value(samples, "ostinato_pass_duration_seconds_bucket", "tick", le="0.001") == 0
    assert value(samples, "ostinato_passes_total", "tick", outcome="failed") == 0

    wait_for(lambda: stack.reported("obs:tick"), what="a report to the coordinator")
    assert value(scrape(port), "ostinato_fence", "tick") == stack.status()["obs:tick"]["fence"]

    # The runner's own work with the coordinator: the three leases renewed in each round
    # (every third of the 10 s lease), with the calls that asked for, renewed and reported.
    def renewed() -> Samples | None:
        samples = scrape(port)
        done = samples.get(("ostinato_lease_renewals_total", frozenset({"app": "obs"}.items())))
        return samples if done is not None and done >= 3 else None

    samples = wait_for(renewed, what="a renewal round in the metrics")

    def calls(call: str) -> float:
        return samples.get(("ostinato_coordinator_calls_total",
                            frozenset({"app": "obs", "call": call}.items())), 0.0)

    renewals = samples[("ostinato_lease_renewals_total", frozenset({"app": "obs"}.items()))]
    # Three leases a round (read from another thread, a round may be half counted).
    assert calls("renew") - 1 <= renewals / 3 <= calls("renew")
    assert calls("acquire") >= 1
    assert calls("report") >= 1
    # Named in the query, they come alone: no loop is read for them.
    status, text = get(f"http://127.0.0.1:{port}/metrics?name[]=ostinato_lease_renewals_total"
                       "&name[]=ostinato_coordinator_calls_total")
    assert status == 200
    assert {f.name for f in text_string_to_metric_families(text)} == {
        "ostinato_lease_renewals", "ostinato_coordinator_calls"}

    status, body = get(f"http://127.0.0.1:{port}/healthz")
    health = json.loads(body)
    assert status == 200, body
    assert health["ok"] is True
    assert health["runner"].endswith(f":{runner.pid}")
    assert sorted(h["loop"] for h in health["held"]) == ["obs:blocker", "obs:flaky", "obs:tick"]
    assert runner.stop() == 0


def test_healthz_turns_503_while_a_held_loop_is_stalled(stack: Stack) -> None:
    """/healthz and ostinato_stalled report a loop whose body blocks, and clear when it returns."""
    port = free_port()
    stack.gate.touch()
    runner = stack.runner("--metrics-port", str(port), "--metrics-host", "127.0.0.1")

    def health() -> tuple[int, dict[str, object]]:
        try:
            status, body = get(f"http://127.0.0.1:{port}/healthz")
        except OSError:
            return 0, {}
        return status, json.loads(body)

    _, body = wait_for(lambda: (h := health())[0] == 503 and h, what="a 503 from /healthz")
    assert body["ok"] is False
    assert body["problems"] == ["obs:blocker: stalled, no pass finished within 1.0s"]
    assert value(scrape(port), "ostinato_stalled", "blocker") == 1
    stack.gate.unlink()
    wait_for(lambda: health()[0] == 200, what="/healthz to recover")
    assert value(scrape(port), "ostinato_stalled", "blocker") == 0
    assert runner.stop() == 0


async def test_only_metrics_and_healthz_are_served_and_other_paths_are_404() -> None:
    """/metrics and /healthz answer 200; /, /nothing and /metrics/extra are 404 with no metrics."""
    runner = Runner("obs", [], MemoryCoordinator())
    server = MetricsServer(runner, "127.0.0.1", 0)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        metrics = await asyncio.to_thread(get, f"{base}/metrics")
        health = await asyncio.to_thread(get, f"{base}/healthz")
        others = {path: await asyncio.to_thread(get, f"{base}{path}")
                  for path in ("/", "/nothing", "/metrics/extra", "/healthz/")}
    finally:
        server.stop()
    assert metrics[0] == 200
    assert "process_cpu_seconds_total" in metrics[1]
    assert health[0] == 200
    assert json.loads(health[1])["ok"] is True
    for path, (status, body) in others.items():
        assert status == 404, path
        assert "process_cpu_seconds_total" not in body
        assert "/metrics" in body  # says where the metrics are


def test_a_metrics_port_in_use_is_one_clear_line(stack: Stack) -> None:
    """A busy --metrics-port fails the runner with one line naming the port, not a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = stack.cli("run", APP, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ostinato: error: cannot serve metrics on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("prometheus_client", ["run", APP, "--metrics-port", "9464"], "metrics"),
        ("uvicorn", ["dashboard"], "dashboard"),
    ],
)
def test_a_missing_extra_names_the_pip_install(stack: Stack, module: str, args: list[str],
                                               extra: str) -> None:
    """Without the extra installed, the command says which pip install to run, in one line."""
    hide = f"import sys; sys.modules[{module!r}] = None; from ostinato.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", hide, *args, "--coordinator", stack.url],
                            env=stack.env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(f"pip install 'ostinato[{extra}]'")
    assert "Traceback" not in result.stderr


async def test_a_failing_loop_shows_in_metrics_and_fails_healthz() -> None:
    """``ostinato_failing`` is 1 and /healthz is 503 naming the loop while its passes all fail;
    both clear once a pass works."""
    import ostinato
    from ostinato.loop import Pass
    from tests.runner.test_runner import until

    app = ostinato.App("obs", coordinator=MemoryCoordinator(), grace="1s")
    broken = [True]

    @app.loop(pause="5ms", error_backoff=("1ms", "2ms"))
    def shaky(ctx: Pass) -> None:
        if broken[0]:
            raise RuntimeError("no upstream")

    async with app.running() as runner:
        server = MetricsServer(runner, "127.0.0.1", 0)
        server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            await until(lambda: runner.keepers["obs:shaky"].failing)
            samples = await asyncio.to_thread(scrape, server.port)
            status, body = await asyncio.to_thread(get, f"{base}/healthz")
            assert value(samples, "ostinato_failing", "shaky") == 1
            assert status == 503
            (problem,) = json.loads(body)["problems"]
            assert problem.startswith("obs:shaky: failing, the last ")
            assert problem.endswith("passes all failed (last error: RuntimeError: no upstream)")
            broken[0] = False
            await until(lambda: not runner.keepers["obs:shaky"].failing)
            samples = await asyncio.to_thread(scrape, server.port)
            status, _ = await asyncio.to_thread(get, f"{base}/healthz")
            assert value(samples, "ostinato_failing", "shaky") == 0
            assert status == 200
        finally:
            server.stop()
