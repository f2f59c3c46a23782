"""Celery: an app's loops run as tasks on the plain ``celery worker`` processes a team already has.

::

    celery = Celery("proj", broker="redis://...")
    app = ostinato.App("metrics", coordinator="redis://...")

    @app.loop(pause="1s", stall_after="30s")
    def aggregate(ctx): ...

    ostinato.celery.attach(app, celery)          # mode="chain" (default) or mode="clock"

``celery -A proj worker`` then runs the loops; nothing else to start, nothing to
seed. ``attach`` registers two tasks, ``ostinato.APP.link`` (chain mode) and
``ostinato.APP.pass`` (clock mode), on the default queue unless ``queue=`` names
another (each message shown as ``ostinato.APP.link:LOOP`` in the workers' logs and
``celery inspect``), and a worker bootstep that runs the keeper (``ostinato.chains``) in each
worker's main process. The leases, the fences, the chains' generations and the
reports are the core's (``ostinato.links``); this module only carries messages.

Pools: ``prefork`` (the default), ``solo`` and ``threads``. ``eventlet`` and
``gevent`` are refused when the worker starts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ostinato import logs
from ostinato.app import App
from ostinato.chains import Keeper, KeeperThread, seed
from ostinato.coordinators.protocol import RunnerInfo
from ostinato.durations import Duration, parse_duration
from ostinato.errors import ConfigurationError, MissingExtraError
from ostinato.links import JobOptions, Link, Tally, check_hostable, run_clock_pass, run_link
from ostinato.operate import run_sync

try:
    from celery import Celery, bootsteps  # type: ignore[import-untyped]
    from celery.worker import state as worker_state  # type: ignore[import-untyped]
except ImportError:
    raise MissingExtraError("ostinato.celery", "celery") from None

__all__ = ["Attached", "attach"]

log = logging.getLogger("ostinato.jobs")

#: Pools a worker may use to host loops (by the module Celery names them after).
POOLS = {"prefork": "prefork", "solo": "solo", "thread": "threads"}


class Attached:
    """An app attached to a Celery app: its tasks, and a way to seed a chain by hand."""

    def __init__(self, app: App, celery: Any, mode: str, options: JobOptions, queue: str | None,
                 metrics_port: int | None = None) -> None:
        self.app, self.celery, self.mode, self.options, self.queue = app, celery, mode, options, queue
        self.metrics_port = metrics_port
        #: What this worker's links did (its pool processes share it) and its keeper forged.
        self.tally, self.forges = Tally(), Counter[str]()
        #: Who the workers report as: one runner per worker (its pool processes included).
        self.worker = RunnerInfo.here(hosts=tuple(f"{app.name}:{name}" for name in app.loops))

        def link(data: Mapping[str, Any]) -> str:
            return run_link(app, data, self.enqueue_link, worker=self.worker, options=options,
                            stopping=_stopping, tally=self.tally)

        def clock_pass(name: str, slot: float, due: list[Any] | None = None) -> str:
            return run_clock_pass(app, name, slot, worker=self.worker, options=options, tally=self.tally,
                                  due=None if due is None else (float(due[0]), float(due[1]), int(due[2])))

        self.link_task = celery.task(name=f"ostinato.{app.name}.link", ignore_result=True)(link)
        self.pass_task = celery.task(name=f"ostinato.{app.name}.pass", ignore_result=True)(clock_pass)

    def _route(self, delay: float, shown_as: str) -> dict[str, Any]:
        # ``shadow`` is the name workers log and ``celery inspect`` shows: it names the loop.
        options: dict[str, Any] = {"shadow": shown_as}
        if self.queue is not None:
            options["queue"] = self.queue
        if delay > 0:
            options["countdown"] = delay
        return options

    def enqueue_link(self, link: Link, delay: float) -> None:
        self.link_task.apply_async(args=[link.encode()],
                                   **self._route(delay, f"{self.link_task.name}:{link.loop}"))

    def enqueue_pass(
        self, name: str, slot: float, delay: float, due: tuple[float, float, int] | None
    ) -> None:
        self.pass_task.apply_async(args=[name, slot, None if due is None else list(due)],
                                   **self._route(delay, f"{self.pass_task.name}:{name}"))

    def keeper(self) -> Keeper:
        return Keeper(self.app, "celery", worker=self.worker, options=self.options, mode=self.mode,
                      enqueue_link=self.enqueue_link, enqueue_pass=self.enqueue_pass, counts=self.forges)

    def seed(self, name: str, *, wait: Duration = "0s") -> Link | None:
        """Forge a chain of loop ``name`` now if nothing holds the loop (the keeper does this by
        itself; this is for operators and tests). A live chain holds the loop all along, so
        this returns ``None`` then; ``wait`` waits that long for the lease to be free."""
        seconds = parse_duration(wait, what="wait")
        return run_sync(seed(self.app, name, self.enqueue_link, self.worker, options=self.options,
                             wait=seconds))


def _stopping() -> bool:
    """Whether this worker is shutting down (seen in the main process: the solo and threads pools).
    Celery sets the flags to the exit code, 0 included, so only ``None`` and ``False`` mean no."""
    return any(flag is not None and flag is not False
               for flag in (worker_state.should_stop, worker_state.should_terminate))


def attach(
    app: App, celery: Celery, *, mode: str = "chain", queue: str | None = None,
    budget: Duration = "1s", patience: Duration | None = None, metrics_port: int | None = None,
) -> Attached:
    """Run ``app``'s loops on ``celery``'s workers.

    - ``mode="chain"``: each loop is a chain of tasks, each running passes for up to
      ``budget`` and enqueueing the next with the loop's pacing as its countdown.
    - ``mode="clock"``: an elected keeper enqueues one task per slot of each loop's
      ``every=`` or ``cron=``; a slot whose previous pass still runs is skipped.
    - ``queue``: the queue of the tasks (default: Celery's default queue).
    - ``patience``: how late a link may be before its chain is re-forged (default 2 s,
      or half the loop's ``stall_after`` when shorter).
    - ``metrics_port``: each worker serves Prometheus metrics of its links and keeper there
      (``ostinato_job_links``, ``ostinato_chains_forged``; needs ``ostinato[metrics]``).
    """
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
    attached = Attached(app, celery, mode, options, queue, metrics_port)
    celery.steps["worker"].add(_keeper_step(attached))
    return attached


def _keeper_step(attached: Attached) -> type[Any]:
    """A worker bootstep that runs ``attached``'s keeper from the worker's start to its stop."""

    class OstinatoKeeper(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.thread: KeeperThread | None = None

        def start(self, parent: Any) -> None:
            pool = getattr(parent.pool_cls, "__module__", "").rpartition(".")[2]
            if pool not in POOLS:
                raise ConfigurationError(
                    f"ostinato cannot host loops on a Celery {pool!r} pool: start the worker with "
                    f"--pool {', --pool '.join(POOLS.values())}"
                )
            logs.make_visible()
            self.thread = KeeperThread(attached.keeper(), tally=attached.tally,
                                       metrics_port=attached.metrics_port)
            self.thread.start()

        def stop(self, parent: Any) -> None:
            if self.thread is not None:
                self.thread.stop()
                self.thread = None

        terminate = stop
        shutdown = stop

    OstinatoKeeper.__name__ = OstinatoKeeper.__qualname__ = f"OstinatoKeeper_{attached.app.name}"
    OstinatoKeeper.name = f"ostinato.keeper.{attached.app.name}"
    return OstinatoKeeper
