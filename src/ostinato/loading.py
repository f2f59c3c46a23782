"""Importing what ``module:attr`` or ``path/to/file.py:attr`` names (``ostinato run APP``, and an
isolated loop's child process)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ostinato.errors import ConfigurationError, OstinatoError


def import_target(target: str) -> object:
    """Import the module ``target`` names and return its attribute; ``ConfigurationError``
    naming what is wrong otherwise."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigurationError(
            f"bad APP {target!r}: write module:attribute or path/to/file.py:attribute"
        )
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigurationError(f"bad APP {target!r}: no file {where!r}")
        sys.path.insert(0, str(path.resolve().parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"bad APP {target!r}: cannot import {where!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except OstinatoError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"importing {where!r} failed: {exc!r}") from exc
    else:
        sys.path.insert(0, ".")
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise ConfigurationError(f"bad APP {target!r}: no module {where!r} ({exc})") from exc
        except OstinatoError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"importing {where!r} failed: {exc!r}") from exc
    if not hasattr(module, attr):
        raise ConfigurationError(f"bad APP {target!r}: {where!r} has no attribute {attr!r}")
    return getattr(module, attr)
