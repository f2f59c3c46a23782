"""The project's app for a process that is not ``manage.py``: importing this module sets
Django up (``DJANGO_SETTINGS_MODULE`` must name the settings), which imports every
installed app's ``loops.py``. ``ostinato run ostinato.django.standalone:app`` works, and
so do the child processes of ``isolation="process"`` loops, which import it.
"""

from __future__ import annotations

import django  # type: ignore[import-untyped]

django.setup()

from ostinato.django import app  # noqa: E402  # only once Django is set up

__all__ = ["app"]
