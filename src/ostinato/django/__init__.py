"""Django: ``INSTALLED_APPS += ["ostinato.django"]``, then declare loops in any installed
app's ``loops.py`` on the project's one app::

    from ostinato.django import app

    @app.loop(every="5s")
    def sync_orders(ctx):
        Order.objects.filter(...)

and run them with ``python manage.py ostinato run``. Settings: ``ostinato.django.conf``.
Around every pass Django's ``close_old_connections()`` runs, as around a request.
``include("ostinato.django.urls")`` serves the dashboard behind the project's login
(``views``), and the admin lists the loops (``admin``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ostinato.errors import MissingExtraError

try:
    import django  # type: ignore[import-untyped]  # noqa: F401  # the extra, checked once
except ImportError:
    raise MissingExtraError("ostinato.django", "django") from None

if TYPE_CHECKING:
    from ostinato.app import App
    from ostinato.django.conf import Settings

__all__ = ["app", "get_app", "settings"]

#: What child processes and processes other than manage.py import (``standalone``).
TARGET = "ostinato.django.standalone:app"
_lock = threading.Lock()
_app: list[App] = []


def settings() -> Settings:
    """``settings.OSTINATO`` read and checked (``ConfigurationError`` names a wrong key)."""
    from django.conf import settings as django_settings  # type: ignore[import-untyped]

    from ostinato.django import conf

    return conf.read(getattr(django_settings, "OSTINATO", None), django_settings.DATABASES)


def get_app() -> App:
    """The project's ``App``, made on first use from ``settings.OSTINATO``."""
    with _lock:
        if not _app:
            from ostinato.app import App

            found = settings()
            made = App(found.app, coordinator=found.coordinator, grace=found.grace)
            made.target = TARGET
            _app.append(made)
        return _app[0]


def __getattr__(name: str) -> App:
    if name == "app":  # made once settings can be read, not when this module is imported
        return get_app()
    raise AttributeError(f"module 'ostinato.django' has no attribute {name!r}")
