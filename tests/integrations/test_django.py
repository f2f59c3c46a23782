"""Django: a real project (settings, a model, its migration, loops.py) driven through
manage.py in child processes, since Django's settings are process-wide."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ostinato.django.conf import coordinator_from, read
from ostinato.django.management.commands.ostinato import command_line
from ostinato.errors import ConfigurationError
from tests.servers import postgres_url

ROOT = Path(__file__).resolve().parents[2]

SETTINGS = '''
import json, os
from pathlib import Path
BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "not secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "shop", "ostinato.django"]
DATABASES = {"default": json.loads(os.environ["PROJECT_DATABASE"]) if "PROJECT_DATABASE" in os.environ
             else {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
OSTINATO = json.loads(os.environ.get("PROJECT_OSTINATO", '{"APP": "shop", "GRACE": "5s"}'))
'''

MODELS = '''
from django.db import models

class Tick(models.Model):
    loop = models.CharField(max_length=50)
    number = models.IntegerField()
    fence = models.IntegerField()
'''

MIGRATION = '''
from django.db import migrations, models

class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [migrations.CreateModel(name="Tick", fields=[
        ("id", models.AutoField(primary_key=True, serialize=False)),
        ("loop", models.CharField(max_length=50)),
        ("number", models.IntegerField()),
        ("fence", models.IntegerField()),
    ])]
'''

LOOPS = '''
import os
from asgiref.sync import sync_to_async
from django.db import connection
from ostinato.django import app
from shop.models import Tick

#: The DB-API connection each pass used, for the test to kill behind Django's back.
USED = []

def record(name, ctx):
    Tick.objects.create(loop=name, number=ctx.number, fence=ctx.fence)
    raw = connection.connection
    USED.append((raw, getattr(getattr(raw, "info", None), "backend_pid", None)))

@app.loop(pause=os.environ.get("TICK_PAUSE", "20ms"), error_backoff=("10ms", "20ms"))
def tick(ctx):
    record("tick", ctx)

@app.loop(pause=os.environ.get("TICK_PAUSE", "20ms"), error_backoff=("10ms", "20ms"))
async def tock(ctx):
    await sync_to_async(record)("tock", ctx)
'''

#: Runs both loops; after the first pass of each, kills that pass's database connection
#: behind Django's back, then lets the loops go on; prints what the passes did.
KILLER = '''
import asyncio, json, os, sys, time
import django
django.setup()
from ostinato.django import app
from shop import loops
from shop.models import Tick

def kill(raw, pid):
    if pid is not None:  # psycopg: end the server's backend, as a restart or a proxy would
        import psycopg
        with psycopg.connect(os.environ["KILL_WITH"], autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    else:
        raw.close()

async def main():
    async with app.running(wait=True) as runner:
        keepers = [runner.keepers[f"{app.name}:{name}"] for name in ("tick", "tock")]
        deadline = time.monotonic() + 20
        while not all(k.stats.passes >= 1 for k in keepers):
            await asyncio.sleep(0.005)
        for raw, pid in list(loops.USED):  # the first passes are over: kill what they used
            kill(raw, pid)
        seen = {k.key: k.stats.passes for k in keepers}
        while not all(k.stats.passes >= seen[k.key] + 3 or k.stats.errors >= 3 for k in keepers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        result = {k.key: {"passes": k.stats.passes, "errors": k.stats.errors,
                          "last_error": k.stats.last_error} for k in keepers}
    result["rows"] = await asyncio.to_thread(lambda: Tick.objects.count())
    print(json.dumps(result))

asyncio.run(main())
'''


def make_project(where: Path) -> Path:
    """A Django project: settings, an app with a model, its migration and loops.py, manage.py."""
    (where / "proj").mkdir()
    (where / "proj" / "__init__.py").write_text("")
    (where / "proj" / "settings.py").write_text(SETTINGS)
    (where / "shop" / "migrations").mkdir(parents=True)
    (where / "shop" / "__init__.py").write_text("")
    (where / "shop" / "migrations" / "__init__.py").write_text("")
    (where / "shop" / "migrations" / "0001_initial.py").write_text(MIGRATION)
    (where / "shop" / "models.py").write_text(MODELS)
    (where / "shop" / "loops.py").write_text(LOOPS)
    (where / "killer.py").write_text(KILLER)
    (where / "manage.py").write_text(textwrap.dedent('''
        import os, sys
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        from django.core.management import execute_from_command_line
        execute_from_command_line(sys.argv)
    '''))
    return where


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("OSTINATO_")}
    out.update(DJANGO_SETTINGS_MODULE="proj.settings", PYTHONPATH=str(ROOT), **extra)
    return out


def manage(project: Path, *args: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=project, env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    made = make_project(tmp_path)
    done = manage(made, "migrate", "-v", "0")
    assert done.returncode == 0, done.stderr
    return made


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def ticks(project: Path) -> int:
    with sqlite3.connect(project / "db.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM shop_tick").fetchone()[0])


def test_manage_py_ostinato_run_stops_on_sigterm_and_status_shows_the_loops(project: Path) -> None:
    """`manage.py ostinato run` runs loops.py's loops on the project's SQLite; SIGTERM exits 0."""
    runner = subprocess.Popen([sys.executable, "manage.py", "ostinato", "run"], cwd=project,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (project / "db.sqlite3").exists() and ticks(project) >= 6)
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=15)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 0, err
    assert "shop:tick: lease acquired" in err
    assert (project / "db.ostinato.db").exists()  # a file of its own, next to the project's
    status = manage(project, "ostinato", "status", "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["coordinator"] == f"sqlite:///{project / 'db.ostinato.db'}"
    loops = {f"{row['app']}:{row['loop']}": row for row in shown["loops"]}
    assert set(loops) == {"shop:tick", "shop:tock"}
    assert loops["shop:tick"]["passes"] >= 1
    assert loops["shop:tick"]["holder"] is None  # released on the way out
    paused = manage(project, "ostinato", "pause", "tick")
    assert (paused.returncode, paused.stdout.strip()) == (0, "paused shop:tick")


def test_a_connection_killed_between_passes_leaves_the_next_pass_working(project: Path) -> None:
    """SQLite: the connection a sync pass and an async pass used is closed behind Django's back."""
    done = subprocess.run([sys.executable, "killer.py"], cwd=project, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("shop:tick", "shop:tock"):
        assert result[key]["errors"] == 0, result[key]["last_error"]
        assert result[key]["passes"] >= 4
    assert result["rows"] >= 8


@pytest.mark.backend
def test_a_postgres_connection_terminated_between_passes_leaves_the_next_pass_working(
    tmp_path: Path,
) -> None:
    """PostgreSQL: pg_terminate_backend of the passes' connections; the coordinator is the same DB."""
    url = urlsplit(postgres_url())
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
                "USER": url.username or "", "PASSWORD": url.password or "",
                "HOST": url.hostname or "", "PORT": str(url.port or "")}
    schema_free = f"shop{os.getpid()}_{int(time.time() * 1000) % 100000}"
    made = make_project(tmp_path)
    extra = {"PROJECT_DATABASE": json.dumps(database), "KILL_WITH": postgres_url(),
             "PROJECT_OSTINATO": json.dumps({"APP": schema_free, "GRACE": "5s"})}
    migrated = manage(made, "migrate", "-v", "0", **extra)
    try:
        assert migrated.returncode == 0, migrated.stderr
        done = subprocess.run([sys.executable, "killer.py"], cwd=made, env=env(**extra),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        for key in (f"{schema_free}:tick", f"{schema_free}:tock"):
            assert result[key]["errors"] == 0, result[key]["last_error"]
            assert result[key]["passes"] >= 4
    finally:
        manage(made, "migrate", "shop", "zero", "-v", "0", **extra)


def test_a_bad_configuration_is_a_system_check_error(tmp_path: Path) -> None:
    """A misspelt key, a database that cannot hold leases, a dashboard rule that cannot be
    imported are `manage.py check` errors."""
    made = make_project(tmp_path)
    typo = manage(made, "check", PROJECT_OSTINATO='{"COORDINATR": "redis://x"}')
    assert typo.returncode == 1
    assert "ostinato.E001" in typo.stderr
    assert "did you mean 'COORDINATOR'?" in typo.stderr
    memory = manage(made, "ostinato", "run", PROJECT_DATABASE=json.dumps(
        {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}))
    assert memory.returncode == 1
    assert "ostinato.E002" in memory.stderr
    assert "OSTINATO = {'COORDINATOR'" in memory.stderr
    bad_url = manage(made, "check", PROJECT_OSTINATO='{"COORDINATOR": "mysql://x"}')
    assert bad_url.returncode == 1
    assert "ostinato.E003" in bad_url.stderr
    bad_rule = manage(made, "check", PROJECT_OSTINATO='{"DASHBOARD_ACCESS": "proj.access.ops"}')
    assert bad_rule.returncode == 1
    assert "ostinato.E001" in bad_rule.stderr
    assert "DASHBOARD_ACCESS']: cannot import 'proj.access.ops'" in bad_rule.stderr


def test_coordinator_urls_are_made_from_the_default_database() -> None:
    """PostgreSQL: the same database, credentials quoted; SQLite: a file of its own beside it."""
    url, problem = coordinator_from({"ENGINE": "django.db.backends.postgresql", "NAME": "shop",
                                     "USER": "app", "PASSWORD": "p@ss/word", "HOST": "db.internal",
                                     "PORT": "6432", "OPTIONS": {"sslmode": "require"}})
    assert (url, problem) == ("postgresql://app:p%40ss%2Fword@db.internal:6432/shop?sslmode=require",
                              None)
    url, _ = coordinator_from({"ENGINE": "django.db.backends.postgresql", "NAME": "shop",
                               "HOST": "/var/run/postgresql"})
    assert url == "postgresql:///shop?host=%2Fvar%2Frun%2Fpostgresql"
    url, _ = coordinator_from({"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app/db.sqlite3"})
    assert url == "sqlite:////srv/app/db.ostinato.db"
    url, problem = coordinator_from({"ENGINE": "django.db.backends.mysql", "NAME": "shop"})
    assert url is None
    assert "'django.db.backends.mysql' cannot hold" in str(problem)
    with pytest.raises(ConfigurationError, match="must be a dict"):
        read(["redis://x"], {})


def test_manage_py_commands_get_the_project_app() -> None:
    """run and next take the app; control commands -A; the rest are passed on unchanged."""
    assert command_line(["run", "--only", "tick"], "sqlite:///x") == [
        "run", "ostinato.django:app", "--only", "tick"]
    assert command_line(["status", "--json"], None) == ["status", "-A", "ostinato.django:app", "--json"]
    assert command_line(["pause", "tick", "-A", "other:app"], None) == ["pause", "tick", "-A", "other:app"]
    assert command_line(["dashboard"], "sqlite:///x") == ["dashboard", "--coordinator", "sqlite:///x"]
    assert command_line([], None) == ["--help"]
