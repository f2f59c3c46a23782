"""The Django app ``ostinato.django``: finds the loops and closes stale connections around passes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from django.apps import AppConfig  # type: ignore[import-untyped]

from ostinato import hooks
from ostinato.hooks import PassOutcome

if TYPE_CHECKING:
    from ostinato.loop import Pass

#: Tasks closing the connections of async passes, kept until done.
_closing: set[asyncio.Future[None]] = set()


@contextlib.contextmanager
def close_old_connections(ctx: Pass) -> Iterator[PassOutcome]:
    """Around a pass, what Django does around a request: close the connections that are
    broken or older than ``CONN_MAX_AGE`` (all of them, by default) before and after.

    A sync body runs in a thread of its own, so this runs there, on the connections the
    body uses. An ``async def`` body reaches the ORM through ``sync_to_async``, so after
    the pass the same is done through ``sync_to_async``, in the thread that ORM work ran
    in (a connection killed between passes is then closed before the next pass).
    """
    from django.db import close_old_connections as close  # type: ignore[import-untyped]

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        close()
        try:
            yield PassOutcome()
        finally:
            close()
        return
    from asgiref.sync import sync_to_async

    try:
        yield PassOutcome()
    finally:
        task = asyncio.ensure_future(sync_to_async(close)())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


class OstinatoConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    """Imports each installed app's ``loops.py`` (``OSTINATO["LOOPS_MODULE"]``) once Django is
    ready, as Celery's ``autodiscover_tasks`` does, and registers the system checks."""

    name = "ostinato.django"
    label = "ostinato"
    verbose_name = "ostinato"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules  # type: ignore[import-untyped]

        from ostinato.django import checks, get_app, settings
        from ostinato.errors import ConfigurationError

        checks.register()
        try:
            found = settings()
        except ConfigurationError:
            return  # the system checks say what is wrong
        get_app()
        autodiscover_modules(found.loops_module)
        if found.close_connections:
            hooks.add_around_pass(close_old_connections)
        else:
            hooks.remove_around_pass(close_old_connections)
