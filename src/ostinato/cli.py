"""The ``ostinato`` command. It parses, then calls library functions."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import NoReturn, TypeVar

import click

from ostinato import control, logs
from ostinato.app import App, resolve_url
from ostinato.coordinators import Coordinator, from_url, redact
from ostinato.coordinators.urls import sqlite_path
from ostinato.durations import parse_duration
from ostinato.errors import ConfigurationError, OstinatoError
from ostinato.loading import import_target
from ostinato.observe import Observe, retired, unhealthy
from ostinato.supervisor import Supervisor, runner_command

T = TypeVar("T")

COORDINATOR_HELP = (
    "Coordinator URL: memory://, sqlite:///path.db, redis://..., postgresql://... "
    "[default: the app's, else sqlite:///ostinato.db]"
)


def load_app(target: str) -> App:
    """Import ``module:attr`` or ``path/to/file.py:attr`` and return the ``App`` it names."""
    app = import_target(target)
    if not isinstance(app, App):
        kind = type(app).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        attr = target.rpartition(":")[2]
        raise ConfigurationError(
            f"bad APP {target!r}: {attr!r} is {article} {kind} ({app!r:.60}), not an ostinato.App"
        )
    return app


def fail(message: str) -> NoReturn:
    click.echo(f"ostinato: error: {message}", err=True)
    sys.exit(2)


def guarded(debug: bool, call: Callable[[], T]) -> T:
    """Run ``call``; an ``OstinatoError`` becomes one line on stderr and exit status 2."""
    try:
        return call()
    except OstinatoError as exc:
        if debug:
            raise
        fail(str(exc))


async def _with(url: str, job: Callable[[Coordinator], Awaitable[T]]) -> T:
    coordinator = from_url(url)
    try:
        await coordinator.open()
        return await job(coordinator)
    finally:
        await coordinator.close()


coordinator_option = click.option(
    "--coordinator", envvar="OSTINATO_COORDINATOR", show_envvar=True, help=COORDINATOR_HELP
)
#: The control commands: the coordinator is given, or that of -A APP, or the default.
control_options = [
    click.option(
        "--coordinator", envvar="OSTINATO_COORDINATOR", show_envvar=True,
        help="Coordinator URL: sqlite:///path.db, redis://..., postgresql://... "
             "[default: -A APP's, else sqlite:///ostinato.db in the current folder]",
    ),
    click.option("-A", "--app", "app_target", metavar="APP", default=None, envvar="OSTINATO_APP",
                 show_envvar=True,
                 help="Use the coordinator of this app (module:attr or path/to/file.py:attr)."),
]


def control_command(fn: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(control_options):
        fn = option(fn)
    return fn


def control_url(coordinator: str | None, app_target: str | None, debug: bool) -> str:
    """The coordinator a control command reads: ``--coordinator``, else ``-A APP``'s, else the
    default. A SQLite file that does not exist is an error: a control command never makes
    one (it would be a coordinator no runner uses)."""
    if coordinator is None and app_target is not None:
        coordinator = guarded(debug, lambda: load_app(app_target)).coordinator_url()
    url = resolve_url(coordinator)
    guarded(debug, lambda: _must_exist(url))
    return url


def _must_exist(url: str) -> None:
    if not url.startswith("sqlite://"):
        from_url(url)  # a bad URL is reported here
        return
    path = sqlite_path(url)
    if not path.exists():
        raise ConfigurationError(
            f"no coordinator found: {url} names {path.resolve()}, which does not exist; run this "
            "where the runners run, or say which with --coordinator URL or -A APP"
        )
debug_option = click.option("--debug", is_flag=True, help="Show tracebacks of errors.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ostinato")
def main() -> None:
    """Run continuous code: loops that repeat forever, one copy at a time."""


@main.command()
@click.argument("app")
@coordinator_option
@click.option("--only", multiple=True, metavar="NAME", help="Run only these loops (repeatable).")
@click.option(
    "--log-level", default="info", show_default=True, envvar="OSTINATO_LOG_LEVEL",
    show_envvar=True, type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format", default="text", show_default=True, envvar="OSTINATO_LOG_FORMAT",
    show_envvar=True, type=click.Choice(["text", "json"]), help="json: one object per line.",
)
@click.option(
    "--processes", type=click.IntRange(min=1), default=None, envvar="OSTINATO_PROCESSES",
    show_envvar=True, help="Fork N runner processes and restart any that dies.",
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, envvar="OSTINATO_METRICS_PORT",
    show_envvar=True, help="Serve Prometheus /metrics and /healthz on this port (e.g. 9464).",
)
@click.option(
    "--metrics-host", default="0.0.0.0", show_default=True, envvar="OSTINATO_METRICS_HOST",  # noqa: S104
    show_envvar=True, help="Address the metrics port binds to.",
)
@click.option(
    "--alert-webhook", metavar="URL", default=None, envvar="OSTINATO_ALERT_WEBHOOK",
    show_envvar=True, help="POST a JSON notice here when a loop stalls and when it recovers.",
)
@debug_option
def run(app: str, coordinator: str | None, only: tuple[str, ...], log_level: str,
        log_format: str, processes: int | None, metrics_port: int | None, metrics_host: str,
        alert_webhook: str | None, debug: bool) -> None:
    """Run the loops of APP (module:attr or path/to/file.py:attr) in this process.

    Start as many runners as you like: each loop runs in exactly one of them at
    a time. SIGTERM or SIGINT finishes the current passes, releases the leases
    and exits 0.
    """
    logs.setup("debug" if debug else log_level, log_format)
    the_app = guarded(debug, lambda: load_app(app))
    if not the_app.loops:
        fail(f"app {app!r} declares no loops; add one with @app.loop")
    url = the_app.coordinator_url(coordinator)
    guarded(debug, lambda: from_url(url))  # a bad URL fails here, before any logging noise
    guarded(debug, lambda: the_app.specs(only or None))  # and so does an unknown --only
    observe = Observe(metrics_port, metrics_host, alert_webhook or None)
    guarded(debug, observe.check)  # a missing extra or a bad webhook URL too
    if processes is not None:
        if metrics_port is not None:
            fail("--metrics-port serves one runner: with --processes N every runner would want it; "
                 "run the runners under a process manager, each with its own port")
        command = runner_command(sys.argv[1:])
        sys.exit(Supervisor(command, processes, grace=the_app.grace).run())
    guarded(debug, lambda: the_app.run(only=only or None, coordinator=url, observe=observe))


@main.command()
@control_command
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option("--check", is_flag=True,
              help="Exit 1 when any loop is stalled, failing or has no runner (or no loop is known).")
@click.option("--retired-after", default="1h", show_default=True, metavar="DURATION",
              help="With --check: a loop that no live runner declares, gone this long, is not counted.")
@click.option("--expand", "-x", is_flag=True,
              help="Show each partition and key of a loop made of them on a line of its own.")
@debug_option
def status(coordinator: str | None, app_target: str | None, as_json: bool, check: bool,
           retired_after: str, expand: bool, debug: bool) -> None:
    """Show every loop: holder, state, fence, passes, errors, timings. A loop made of
    partitions or keys is one line, its members counted by state (--expand lists them)."""
    url = control_url(coordinator, app_target, debug)
    after = guarded(debug, lambda: _duration(retired_after, "--retired-after"))
    rows = guarded(debug, lambda: asyncio.run(_with(url, control.status)))
    if as_json:
        click.echo(json.dumps({"coordinator": redact(url), "loops": rows}, indent=2))
    else:
        click.echo(control.table(rows, expand=expand))
    if check:
        for row in retired(rows, after=after):
            click.echo(f"ostinato: check: not counting {row['app']}:{row['loop']}: no live runner "
                       f"declares it and it has been gone over {retired_after} "
                       f"(ostinato forget {row['app']}:{row['loop']} removes it)", err=True)
        problems = unhealthy(rows, retired_after=after)
        if problems:
            click.echo(f"ostinato: check failed: {'; '.join(problems)}", err=True)
            sys.exit(1)


def _control_command(name: str, action: Callable[[Coordinator, str], Awaitable[str]],
                     verb: str, help_text: str) -> None:
    @main.command(name=name, help=help_text)
    @click.argument("loop")
    @control_command
    @debug_option
    def command(loop: str, coordinator: str | None, app_target: str | None, debug: bool) -> None:
        url = control_url(coordinator, app_target, debug)

        async def job(store: Coordinator) -> str:
            return await action(store, loop)

        key = guarded(debug, lambda: asyncio.run(_with(url, job)))
        click.echo(f"{verb} {key}")


_control_command("pause", control.pause, "paused",
                 "Pause LOOP (name or app:name): its holder stops and no runner takes it.")
_control_command("resume", control.resume, "resumed", "Resume a paused LOOP.")
_control_command("wake", control.wake, "woke", "End LOOP's idle wait now.")


@main.command()
@click.argument("loop")
@control_command
@debug_option
def release(loop: str, coordinator: str | None, app_target: str | None, debug: bool) -> None:
    """Revoke LOOP's lease: another runner takes it at once, with a new fence.

    The old holder starts no new pass once its next renewal fails (at once on
    the coordinators that deliver events).
    """
    url = control_url(coordinator, app_target, debug)

    async def job(store: Coordinator) -> tuple[str, int | None]:
        return await control.release(store, loop)

    key, fence = guarded(debug, lambda: asyncio.run(_with(url, job)))
    if fence is None:
        click.echo(f"{key} had no live lease; any runner may take it now")
    else:
        click.echo(f"released {key} (fence {fence}); the next holder gets a greater fence")


@main.command()
@click.argument("loop")
@control_command
@debug_option
def forget(loop: str, coordinator: str | None, app_target: str | None, debug: bool) -> None:
    """Drop LOOP (name, app:name, or app:* for every loop of an app) from status: for loops
    no runner declares any more. Refused while a runner holds it; its fence is kept, so a
    loop declared again later still gets greater fences."""
    url = control_url(coordinator, app_target, debug)

    async def job(store: Coordinator) -> list[str]:
        return await control.forget(store, loop)

    for key in guarded(debug, lambda: asyncio.run(_with(url, job))):
        click.echo(f"forgot {key}")


@main.command()
@click.argument("loop")
@control_command
@click.option("--refresh", is_flag=True,
              help="Have the runner that refreshes the keys read the key source now, and wait for it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@debug_option
def keys(loop: str, coordinator: str | None, app_target: str | None, refresh: bool, as_json: bool,
         debug: bool) -> None:
    """List the keys of LOOP, a loop declared with keys=: one line each, as every runner
    sees them in the coordinator."""
    url = control_url(coordinator, app_target, debug)

    async def job(store: Coordinator) -> tuple[str, list[str]]:
        return await control.keys(store, loop, refresh=refresh)

    family, listed = guarded(debug, lambda: asyncio.run(_with(url, job)))
    if as_json:
        click.echo(json.dumps({"loop": family, "keys": listed}, indent=2))
    elif listed:
        click.echo("\n".join(listed))
    else:
        click.echo(f"{family} has no keys yet: its key source returned none, or no runner has read it")


@main.command(name="next")
@click.argument("app")
@click.option("--loop", "loop", required=True, metavar="NAME", help="The loop whose starts to show.")
@click.option("--count", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many starts to show.")
@click.option("--after", metavar="ISO-8601", default=None,
              help="Show the starts after this time [default: now]; without an offset it is "
                   "read in the loop's zone.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@debug_option
def next_starts(app: str, loop: str, count: int, after: str | None, as_json: bool,
                debug: bool) -> None:
    """Print the next start times of a loop of APP, one per line, ISO 8601 with the loop's
    offset (DST changes included), to see what a schedule does before deploying it."""
    the_app = guarded(debug, lambda: load_app(app))
    moment = None
    if after is not None:
        try:
            moment = datetime.fromisoformat(after)
        except ValueError:
            fail(f"--after {after!r} is not an ISO 8601 time; write it like 2025-03-30T01:00 "
                 "or 2025-03-30T01:00+01:00")
    starts = guarded(debug, lambda: the_app.next_starts(loop, count=count, after=moment))
    if not as_json:
        click.echo("\n".join(start.isoformat() for start in starts))
        return
    spec = the_app.loops[loop.removeprefix(f"{the_app.name}:")]
    schedule = spec.pacing.schedule
    click.echo(json.dumps({
        "loop": f"{the_app.name}:{spec.name}",
        "cron": spec.pacing.cron,
        "every": spec.pacing.every,
        "zone": None if schedule is None else schedule.zone_name,
        "jitter": spec.pacing.jitter,
        "starts": [start.isoformat() for start in starts],
    }, indent=2))


@main.command()
@coordinator_option
@click.option("--host", default="127.0.0.1", show_default=True, envvar="OSTINATO_DASHBOARD_HOST",
              show_envvar=True, help="Address to listen on (0.0.0.0 exposes the page to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True,
              envvar="OSTINATO_DASHBOARD_PORT", show_envvar=True, help="Port (0: any free one).")
@click.option("--token", default=None, envvar="OSTINATO_DASHBOARD_TOKEN", show_envvar=True,
              help="Secret that the pause, resume, wake and release buttons need; none: read-only.")
@click.option("--sample-every", default="2s", show_default=True, envvar="OSTINATO_DASHBOARD_SAMPLE_EVERY",
              show_envvar=True, help="How often to read the coordinator.")
@click.option(
    "--log-level", default="info", show_default=True, envvar="OSTINATO_LOG_LEVEL",
    show_envvar=True, type=click.Choice(["debug", "info", "warning", "error"]),
)
@debug_option
def dashboard(coordinator: str | None, host: str, port: int, token: str | None, sample_every: str,
              log_level: str, debug: bool) -> None:
    """Serve a live web page of every loop of every app in the coordinator."""
    from ostinato import dashboard as board

    logs.setup("debug" if debug else log_level)
    guarded(debug, board.require)
    url = resolve_url(coordinator)
    every = guarded(debug, lambda: _duration(sample_every, "--sample-every"))
    state = guarded(debug, lambda: board.Board(url, token=token, every=every))
    sock = guarded(debug, lambda: board.bind(host, port))
    where = sock.getsockname()
    shown = f"[{where[0]}]" if ":" in where[0] else where[0]
    mode = "controls need the token" if token else "read-only: no --token"
    click.echo(f"ostinato dashboard on http://{shown}:{where[1]}/ for {redact(url)} ({mode})")
    board.serve(state, sock)


def _duration(text: str, what: str) -> float:
    try:
        seconds = parse_duration(text, what=what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if seconds <= 0:
        raise ConfigurationError(f"{what} must be more than zero, not {text!r}")
    return seconds


