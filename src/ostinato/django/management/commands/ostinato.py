"""``python manage.py ostinato run|status|pause|resume|wake|release|forget|next|dashboard ...``:
the ``ostinato`` command, with the project's app and coordinator already chosen.

Every option of the command line works the same (``manage.py ostinato run --only NAME``,
``manage.py ostinato status --json``); ``--coordinator`` or ``$OSTINATO_COORDINATOR``
still override the settings' coordinator.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand  # type: ignore[import-untyped]

#: What the project's app is imported as by the ``ostinato`` command.
APP = "ostinato.django:app"
#: The commands that take the app as their first argument.
TAKES_APP = ("run", "next")
#: The commands that take ``-A APP`` for its coordinator.
TAKES_A = ("status", "pause", "resume", "wake", "release", "forget", "keys")


def command_line(args: list[str], coordinator: str | None) -> list[str]:
    """The ``ostinato`` command line for ``manage.py ostinato ARGS``."""
    if not args:
        return ["--help"]
    name, rest = args[0], args[1:]
    if name in TAKES_APP:
        return [name, APP, *rest]
    if name in TAKES_A and not {"-A", "--app"} & set(rest):
        return [name, "-A", APP, *rest]
    if name == "dashboard" and "--coordinator" not in rest and coordinator is not None:
        return [name, "--coordinator", coordinator, *rest]
    return args


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type hints
    help = ("Run the project's loops (run) or control them (status, pause, resume, wake, release, "
            "forget, next, dashboard); `manage.py ostinato run --help` shows each one's options.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND [OPTIONS]",
                            help="an ostinato command and its options")

    def handle(self, *args: str, **options: Any) -> None:
        from ostinato.cli import main
        from ostinato.django import get_app

        line = command_line(list(args), get_app().coordinator_url())
        try:
            main.main(args=line, prog_name="manage.py ostinato", standalone_mode=True)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
