"""Coordinator URLs: fit to print, and a SQLite URL's database path, checked."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ostinato.errors import ConfigurationError


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit to print."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<unparseable URL>"


def sqlite_path(url: str) -> Path:
    """The database path of a ``sqlite:///`` URL; its folder must exist."""
    rest = url[len("sqlite://"):]
    if not rest.startswith("/") or rest == "/":
        raise ConfigurationError(
            f"bad SQLite URL {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    raw = rest[1:]
    if raw in ("", ":memory:"):
        raise ConfigurationError(
            f"bad SQLite URL {url!r}: an in-memory SQLite database is private to one "
            "connection; use memory:// for a coordinator inside one process"
        )
    path = Path(raw)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigurationError(
            f"SQLite database folder {str(folder)!r} does not exist (from {url!r}); "
            "create it first, or point the URL elsewhere"
        )
    if not os.access(folder, os.W_OK):
        raise ConfigurationError(
            f"SQLite database folder {str(folder)!r} is not writable (from {url!r})"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigurationError(f"SQLite database {str(path)!r} is not writable")
    return path
