"""The SQLite coordinator's connection thread takes renewals before waiting requests."""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future

from ostinato.coordinators.sqlite import RENEWAL, REQUEST, URGENT, _Worker


def test_renewals_go_first_then_reports_then_lease_requests() -> None:
    """Calls that queue behind a busy connection run by priority, in order within one."""
    worker = _Worker()
    started, gate, order = threading.Event(), threading.Event(), []

    def busy() -> None:
        started.set()
        gate.wait(5)
        order.append("first")

    def call(name: str) -> None:
        order.append(name)

    futures: list[Future[None]] = [worker.submit(REQUEST, busy)]
    assert started.wait(5)  # the connection is busy from here on
    futures += [worker.submit(REQUEST, functools.partial(call, f"request-{n}")) for n in range(3)]
    futures.append(worker.submit(URGENT, lambda: call("report")))
    gave_up = worker.submit(RENEWAL, lambda: call("gave-up"))
    futures.append(worker.submit(RENEWAL, lambda: call("renewal")))
    assert gave_up.cancel()
    gate.set()
    for future in futures:
        future.result(5)
    assert order == ["first", "renewal", "report", "request-0", "request-1", "request-2"]
    worker.stop()


def test_a_failing_call_hands_its_error_to_the_caller() -> None:
    worker = _Worker()
    failed = worker.submit(URGENT, lambda: 1 / 0)
    assert isinstance(failed.exception(5), ZeroDivisionError)
    assert worker.submit(URGENT, lambda: "still working").result(5) == "still working"
    worker.stop()
