"""The ``OSTINATO`` setting of a Django project, read and checked in one place.

::

    OSTINATO = {
        "COORDINATOR": "redis://...",   # default: from DATABASES["default"] (see coordinator_from)
        "APP": "django",                # the app name loops are known by (app:loop)
        "GRACE": "30s",                 # how long a stopping runner lets passes finish
        "LOOPS_MODULE": "loops",        # the module of each installed app that declares loops
        "CLOSE_CONNECTIONS": True,      # close_old_connections() around every pass
        "DASHBOARD_ACCESS": "staff",    # who may see the mounted dashboard (see who_may)
        "DASHBOARD_CONTROL": "staff",   # who may pause, resume, wake, release there (None: nobody)
    }
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ostinato.errors import ConfigurationError

#: Every key ``OSTINATO`` may have, with its default.
DEFAULTS: dict[str, Any] = {
    "COORDINATOR": None,
    "APP": "django",
    "GRACE": "30s",
    "LOOPS_MODULE": "loops",
    "CLOSE_CONNECTIONS": True,
    "DASHBOARD_ACCESS": "staff",
    "DASHBOARD_CONTROL": "staff",
}
#: The rules ``DASHBOARD_ACCESS`` and ``DASHBOARD_CONTROL`` may name; any other string is the
#: dotted path of a function ``(user) -> bool``.
RULES: dict[str, Callable[[Any], bool]] = {
    "staff": lambda user: bool(user.is_active and getattr(user, "is_staff", False)),
    "superuser": lambda user: bool(user.is_active and getattr(user, "is_superuser", False)),
}
_POSTGRES_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")
_SQLITE_ENGINES = ("django.db.backends.sqlite3", "django.contrib.gis.db.backends.spatialite")
#: libpq connection options that are passed on from DATABASES["default"]["OPTIONS"].
_PG_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "options",
               "application_name", "target_session_attrs")


@dataclass(frozen=True)
class Settings:
    """``OSTINATO`` with its defaults filled in; ``coordinator`` is the URL to use, or ``None``
    when none was given and none can be made from the default database (``problem`` says why)."""

    coordinator: str | None
    app: str
    grace: Any
    loops_module: str
    close_connections: bool
    problem: str | None = None
    #: ``DASHBOARD_ACCESS`` and ``DASHBOARD_CONTROL`` as given (checked in form; a dotted path
    #: is imported on use, since ``OSTINATO`` is read before every app's models are).
    dashboard_access: object = "staff"
    dashboard_control: object = "staff"

    def may_see(self, user: Any) -> bool:
        """Whether ``user`` may see the mounted dashboard."""
        return bool(user.is_authenticated and who_may("DASHBOARD_ACCESS", self.dashboard_access)(user))

    def may_control(self, user: Any) -> bool:
        """Whether ``user`` may pause, resume, wake and release loops on the mounted dashboard."""
        if self.dashboard_control is None or not self.may_see(user):
            return False
        return bool(who_may("DASHBOARD_CONTROL", self.dashboard_control)(user))


def read(given: object, databases: dict[str, Any]) -> Settings:
    """Read ``settings.OSTINATO``; raise ``ConfigurationError`` naming the key that is wrong."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigurationError(
            f"settings.OSTINATO must be a dict, like {{'COORDINATOR': 'redis://...'}}, not {given!r}"
        )
    for key in given:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(DEFAULTS)}"
            raise ConfigurationError(f"settings.OSTINATO has no key {key!r}; {hint}")
    merged = {**DEFAULTS, **given}
    for key in ("APP", "LOOPS_MODULE"):
        if not isinstance(merged[key], str) or not merged[key]:
            raise ConfigurationError(f"settings.OSTINATO[{key!r}] must be a non-empty string")
    if not isinstance(merged["CLOSE_CONNECTIONS"], bool):
        raise ConfigurationError("settings.OSTINATO['CLOSE_CONNECTIONS'] must be True or False")
    url, problem = merged["COORDINATOR"], None
    if url is None:
        url, problem = coordinator_from(databases.get("default"))
    elif not isinstance(url, str):
        raise ConfigurationError(
            f"settings.OSTINATO['COORDINATOR'] must be a URL string, not {url!r}"
        )
    if merged["DASHBOARD_ACCESS"] is None:
        raise ConfigurationError(
            "settings.OSTINATO['DASHBOARD_ACCESS'] cannot be None: leave the dashboard out of the "
            "URL conf to serve it to nobody"
        )
    for key in ("DASHBOARD_ACCESS", "DASHBOARD_CONTROL"):
        if merged[key] is not None:
            _rule_form(key, merged[key])
    return Settings(url, merged["APP"], merged["GRACE"], merged["LOOPS_MODULE"],
                    merged["CLOSE_CONNECTIONS"], problem, merged["DASHBOARD_ACCESS"],
                    merged["DASHBOARD_CONTROL"])


def _rule_form(key: str, given: object) -> None:
    """Raise ``ConfigurationError`` unless ``given`` can name a rule (see ``who_may``)."""
    if callable(given):
        return
    if not isinstance(given, str):
        raise ConfigurationError(
            f"settings.OSTINATO[{key!r}] must be 'staff', 'superuser', a function (user) -> bool "
            f"or its dotted path, not {given!r}"
        )
    if given not in RULES and not given.rpartition(".")[0]:
        raise ConfigurationError(
            f"settings.OSTINATO[{key!r}] is {given!r}: write 'staff', 'superuser' or the dotted path "
            "of a function (user) -> bool, like 'myproject.access.ops_team'"
        )


def who_may(key: str, given: object) -> Callable[[Any], bool]:
    """The test of a user that ``OSTINATO[key]`` names: ``"staff"`` (active staff users),
    ``"superuser"``, a function ``(user) -> bool`` or the dotted path of one (imported here)."""
    _rule_form(key, given)
    if callable(given):
        return given
    assert isinstance(given, str)
    if given in RULES:
        return RULES[given]
    module, _, name = given.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"settings.OSTINATO[{key!r}]: cannot import {given!r}: {exc}") from None
    if not callable(found):
        raise ConfigurationError(f"settings.OSTINATO[{key!r}]: {given!r} is not a function")
    return found  # type: ignore[no-any-return]


def coordinator_from(database: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """The coordinator URL made from a ``DATABASES`` entry, or ``None`` and why not.

    PostgreSQL: the same server and database (ostinato keeps its own tables there).
    SQLite: a file of its own next to the project's, ``<name>.ostinato.db``: the runners
    write to it every second or so, and in a file of its own those writes never hold
    SQLite's one write lock against the project's requests.
    """
    if not database:
        return None, "DATABASES has no 'default' database"
    engine = database.get("ENGINE", "")
    if engine in _POSTGRES_ENGINES:
        user, password = database.get("USER") or "", database.get("PASSWORD") or ""
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        host = database.get("HOST") or ""
        netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else quote(host, safe=""))
        if database.get("PORT"):
            netloc += f":{database['PORT']}"
        query = {k: v for k, v in (database.get("OPTIONS") or {}).items() if k in _PG_OPTIONS}
        if host.startswith("/"):  # a Unix socket folder
            netloc = netloc.replace(quote(host, safe=""), "")
            query["host"] = host
        url = f"postgresql://{netloc}/{quote(str(database.get('NAME') or ''), safe='')}"
        return (url + ("?" + urlencode(query) if query else "")), None
    if engine in _SQLITE_ENGINES:
        name = str(database.get("NAME") or "")
        if name in ("", ":memory:") or name.startswith("file:"):
            return None, (f"the default database is SQLite {name or '(no NAME)'!r}, which other "
                          "processes cannot open")
        path = Path(name)
        return f"sqlite:///{path.with_name(path.stem + '.ostinato.db')}", None
    return None, f"the default database's ENGINE {engine!r} cannot hold ostinato's leases"
