"""RQ: an app's loops run as jobs on the RQ workers a team already has.

::

    queue = Queue("default", connection=Redis.from_url("redis://..."))
    app = ostinato.App("metrics", coordinator="redis://...")

    @app.loop(pause="1s")
    def aggregate(ctx): ...

    ostinato.rq.attach(app, queue)               # mode="chain" (default) or mode="clock"

Then ``OSTINATO_APP=tasks:app rq worker -w ostinato.rq.Worker default`` runs the loops
(``OSTINATO_APP`` names the module to import, as for ``ostinato status -A``; an app
imported by ``rq worker -c tasks`` is found as well). Each worker runs a keeper
(``ostinato.chains``) in a thread of its main process; nothing is seeded by hand.
``ostinato.rq.SimpleWorker`` does the same for RQ's ``SimpleWorker`` (jobs in the
worker's own process). A plain RQ worker runs the jobs too, but hosts no keeper.

Delays: a link due within a keeper's turn is enqueued at once and waits in its
job; a later one goes to the queue's ``ScheduledJobRegistry`` (``rq info`` shows
it), from which the elected keeper moves ostinato's own jobs when they are due:
RQ's scheduler is not needed (when it runs too, a link it also moves arrives
twice, and the copy ends as a duplicate).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ostinato import logs
from ostinato.app import App
from ostinato.chains import TICK, Keeper, KeeperThread, seed
from ostinato.coordinators.protocol import RunnerInfo
from ostinato.durations import Duration, parse_duration
from ostinato.errors import ConfigurationError, MissingExtraError
from ostinato.links import JobOptions, Link, Tally, check_hostable, run_clock_pass, run_link
from ostinato.operate import run_sync

try:
    import rq
    from rq.job import Job
    from rq.registry import ScheduledJobRegistry
    from rq.utils import current_timestamp
except ImportError:
    raise MissingExtraError("ostinato.rq", "rq") from None

__all__ = ["Attached", "SimpleWorker", "Worker", "attach"]

log = logging.getLogger("ostinato.jobs")

#: The functions the jobs call, by the names RQ stores.
LINK = "ostinato.rq.link"
CLOCK_JOB = "ostinato.rq.clock_pass"
#: Apps attached in this process, by name (a work horse inherits them from its worker).
_attached: dict[str, Attached] = {}
#: The worker this process runs, if any: a job in its own process sees its warm shutdown.
_current: rq.worker.BaseWorker | None = None


class Attached:
    """An app attached to an RQ queue: how its jobs are enqueued, and a way to seed by hand."""

    def __init__(self, app: App, queue: rq.Queue, mode: str, options: JobOptions,
                 metrics_port: int | None = None) -> None:
        self.app, self.queue, self.mode, self.options = app, queue, mode, options
        self.metrics_port = metrics_port
        #: What this worker's links did (its work horses share it) and its keeper forged.
        self.tally, self.forges = Tally(), Counter[str]()
        self.worker = RunnerInfo.here(hosts=tuple(f"{app.name}:{name}" for name in app.loops))
        try:
            self.target: str | None = app.locate()
        except ConfigurationError:
            self.target = None  # found by name in processes that imported it

    def _enqueue(self, function: str, args: tuple[Any, ...], delay: float, description: str) -> None:
        options: dict[str, Any] = {"result_ttl": 0, "description": description}
        if delay <= TICK:
            self.queue.enqueue(function, *args, **options)
        else:
            at = datetime.fromtimestamp(datetime.now(UTC).timestamp() + delay, UTC)
            self.queue.enqueue_at(at, function, *args, **options)

    def enqueue_link(self, link: Link, delay: float) -> None:
        self._enqueue(LINK, (self.app.name, link.encode(), self.target), delay,
                      f"ostinato link {self.app.name}:{link.loop} (generation {link.generation})")

    def enqueue_pass(
        self, name: str, slot: float, delay: float, due: tuple[float, float, int] | None
    ) -> None:
        self._enqueue(CLOCK_JOB, (self.app.name, name, slot, None if due is None else list(due),
                                   self.target), delay, f"ostinato pass {self.app.name}:{name}")

    def move_due(self) -> int:
        """Move ostinato's jobs that are due from the queue's scheduled registry to the queue
        (the elected keeper calls this every turn); return how many."""
        registry = ScheduledJobRegistry(queue=self.queue)  # type: ignore[no-untyped-call]
        ids = registry.get_jobs_to_schedule(current_timestamp())
        if not ids:
            return 0
        jobs = [job for job in Job.fetch_many(ids, connection=self.queue.connection)
                if job is not None and job.func_name in (LINK, CLOCK_JOB)]
        with self.queue.connection.pipeline() as pipe:
            for job in jobs:
                self.queue.enqueue_job(job, pipeline=pipe)
                registry.remove(job.id, pipeline=pipe)
            pipe.execute()
        return len(jobs)

    def keeper(self) -> Keeper:
        return Keeper(self.app, "rq", worker=self.worker, options=self.options, mode=self.mode,
                      enqueue_link=self.enqueue_link, enqueue_pass=self.enqueue_pass,
                      on_tick=self.move_due, counts=self.forges)

    def seed(self, name: str, *, wait: Duration = "0s") -> Link | None:
        """Forge a chain of loop ``name`` now if nothing holds the loop (the keeper does this by
        itself; this is for operators and tests). A live chain holds the loop all along, so
        this returns ``None`` then; ``wait`` waits that long for the lease to be free."""
        seconds = parse_duration(wait, what="wait")
        return run_sync(seed(self.app, name, self.enqueue_link, self.worker, options=self.options,
                             wait=seconds))


def attach(
    app: App, queue: rq.Queue, *, mode: str = "chain", budget: Duration = "1s",
    patience: Duration | None = None, metrics_port: int | None = None,
) -> Attached:
    """Run ``app``'s loops as jobs on ``queue`` (see ``ostinato.celery.attach`` for the modes,
    ``budget``, ``patience`` and ``metrics_port``)."""
    if mode not in ("chain", "clock"):
        raise ConfigurationError(f"mode={mode!r}: use mode='chain' or mode='clock'")
    check_hostable(app, mode)
    try:
        options = JobOptions(
            budget=parse_duration(budget, what="budget"),
            patience=None if patience is None else parse_duration(patience, what="patience"),
        )
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    attached = _attached[app.name] = Attached(app, queue, mode, options, metrics_port)
    return attached


def _find(app_name: str, target: str | None) -> Attached:
    found = _attached.get(app_name)
    if found is None and target is not None:
        from ostinato.cli import load_app  # importing the app's module attaches it

        load_app(target)
        found = _attached.get(app_name)
    if found is None:
        raise ConfigurationError(
            f"no ostinato app {app_name!r} is attached in this worker: import the module that "
            "calls ostinato.rq.attach (OSTINATO_APP=module:app, or rq worker -c module)"
        )
    return found


def _stopping() -> bool:
    worker = _current
    return worker is not None and bool(getattr(worker, "_stop_requested", False))


def link(app_name: str, data: Mapping[str, Any], target: str | None = None) -> str:
    """The job of one link of a chain."""
    attached = _find(app_name, target)
    return run_link(attached.app, data, attached.enqueue_link, worker=attached.worker,
                    options=attached.options, stopping=_stopping, tally=attached.tally)


def clock_pass(app_name: str, name: str, slot: float, due: list[Any] | None = None,
               target: str | None = None) -> str:
    """The job of one pass a clock enqueued."""
    attached = _find(app_name, target)
    return run_clock_pass(attached.app, name, slot, worker=attached.worker, options=attached.options,
                          tally=attached.tally,
                          due=None if due is None else (float(due[0]), float(due[1]), int(due[2])))


class _Hosting:
    """What ``Worker`` and ``SimpleWorker`` add to RQ's: a keeper for every app attached to one
    of the worker's queues, from the start of its work to its end."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        global _current
        names = self.queue_names()  # type: ignore[attr-defined]
        for target in filter(None, os.environ.get("OSTINATO_APP", "").split(",")):
            from ostinato.cli import load_app

            load_app(target.strip())
        hosted = [a for a in _attached.values() if a.queue.name in names]
        if not hosted:
            raise ConfigurationError(
                f"no ostinato app is attached to the queues {', '.join(names)}: set OSTINATO_APP="
                "module:app (the module that calls ostinato.rq.attach), or pass it with rq worker -c"
            )
        logs.make_visible()
        threads = [KeeperThread(a.keeper(), tally=a.tally, metrics_port=a.metrics_port) for a in hosted]
        _current = self  # type: ignore[assignment]
        for thread in threads:
            thread.start()
        try:
            result: bool = super().work(*args, **kwargs)  # type: ignore[misc]
            return result
        finally:
            for thread in threads:
                thread.stop()
            _current = None


    def unsubscribe(self) -> None:
        """RQ's own, with the pubsub thread told to stop first: RQ 3 unsubscribes and then joins
        that thread, which, once unsubscribed, may wait up to a minute for a subscription
        before it looks at its stop flag, holding the worker's warm shutdown up as long."""
        thread = getattr(self, "pubsub_thread", None)
        if thread is not None:
            thread.stop(timeout=0)
        super().unsubscribe()  # type: ignore[misc]


class Worker(_Hosting, rq.Worker):
    """RQ's forking worker (a work horse per job) that also keeps the attached apps' loops."""


class SimpleWorker(_Hosting, rq.SimpleWorker):
    """RQ's ``SimpleWorker`` (jobs in the worker's process) that also keeps the loops; a warm
    shutdown ends the running link after its pass, with the chain intact."""
