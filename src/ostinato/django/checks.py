"""Django system checks for ``settings.OSTINATO`` (``manage.py check`` runs them)."""

from __future__ import annotations

from typing import Any

from ostinato.errors import ConfigurationError


def register() -> None:
    from django.core import checks  # type: ignore[import-untyped]

    checks.register(check_settings, "ostinato")


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """``ostinato.E001``: ``OSTINATO`` is wrong (or a dashboard rule it names cannot be
    imported); ``E002``: no coordinator is given and none can
    be made from the default database; ``E003``: the coordinator URL is wrong;
    ``W001``: no installed app declares a loop."""
    from django.core.checks import Error, Warning  # type: ignore[import-untyped]

    from ostinato.coordinators import from_url
    from ostinato.django import conf, get_app, settings

    try:
        found = settings()
        for key, rule in (("DASHBOARD_ACCESS", found.dashboard_access),
                          ("DASHBOARD_CONTROL", found.dashboard_control)):
            if rule is not None:
                conf.who_may(key, rule)  # a dotted path imports
    except ConfigurationError as exc:
        return [Error(str(exc), hint="See the OSTINATO setting in the integrations docs.",
                      id="ostinato.E001")]
    if found.coordinator is None:
        return [Error(
            f"ostinato has no coordinator: {found.problem}.",
            hint="Set OSTINATO = {'COORDINATOR': 'postgresql://...'} (or redis://..., "
                 "sqlite:////path/to/file.db) in the settings.",
            id="ostinato.E002",
        )]
    try:
        from_url(found.coordinator)
    except ConfigurationError as exc:
        return [Error(str(exc), hint="Fix OSTINATO['COORDINATOR'] (or the default database).",
                      id="ostinato.E003")]
    if not get_app().loops:
        return [Warning(
            f"no installed app declares a loop in its {found.loops_module}.py.",
            hint="Declare loops with `from ostinato.django import app` and `@app.loop(...)` in "
                 f"<your app>/{found.loops_module}.py.",
            id="ostinato.W001",
        )]
    return []
