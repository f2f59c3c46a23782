"""The integrations are extras: the core imports without them, each names its pip install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integrations.test_django import env, make_project

BLOCKED = '''
import json, sys
for name in ("django", "sentry_sdk", "opentelemetry"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import ostinato
from ostinato import MissingExtraError
said = {}
for module in ("ostinato.django", "ostinato.sentry", "ostinato.otel"):
    try:
        __import__(module)
    except MissingExtraError as exc:
        said[module] = str(exc)
print(json.dumps(said))
'''


def test_the_core_imports_without_the_extras_and_each_names_its_install() -> None:
    """Without django, sentry-sdk and opentelemetry, ostinato imports; each integration names its extra."""
    done = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=30,
                          check=True)
    said = json.loads(done.stdout)
    assert said == {
        f"ostinato.{name}": f"ostinato.{name} needs an optional dependency: run  "
                            f"pip install 'ostinato[{extra}]'"
        for name, extra in (("django", "django"), ("sentry", "sentry"), ("otel", "otel"))
    }


def test_the_standalone_module_sets_django_up_and_finds_the_loops(tmp_path: Path) -> None:
    """Importing ostinato.django.standalone outside manage.py gives the app with loops.py's loops."""
    project = make_project(tmp_path)
    code = "import ostinato.django.standalone as s; print(sorted(s.app.loops), s.app.target)"
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['tick',", "'tock']", "ostinato.django.standalone:app"]
