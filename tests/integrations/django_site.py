"""A Django site with the admin, logins and the dashboard mounted at ``/ostinato/``, driven by
Django's test client. Each public function runs in a process of its own (Django's settings
are process-wide; see ``site``) and returns what the client saw, for the test to assert on."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

#: The loops a runner in the site's process holds while each scenario runs.
KEYS = ("site:tick",)
#: A key with a slash in it, as a keyed loop's may have: known to the coordinator, held by none.
ODD = "site:sync[a/b]"


def site(scenario: Callable[..., dict[str, Any]], tmp: Path, **ostinato: Any) -> dict[str, Any]:
    """Run ``scenario(tmp)`` in a fresh process whose site has ``OSTINATO`` plus ``ostinato``."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run, scenario, str(tmp), ostinato).result(timeout=90)


def ops_only(user: Any) -> bool:
    """A ``DASHBOARD_ACCESS`` rule of the project's own: members of the group ``ops``."""
    return bool(user.groups.filter(name="ops").exists())


def _run(scenario: Callable[..., dict[str, Any]], tmp: str, ostinato: dict[str, Any]) -> dict[str, Any]:
    _configure(tmp, ostinato)
    with runner():
        return scenario(Path(tmp))


def _configure(tmp: str, ostinato: dict[str, Any]) -> None:
    """Settings for the site in ``tmp``, then ``django.setup()`` and its migrations."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    url = f"sqlite:///{tmp}/ostinato.db"
    settings.configure(
        SECRET_KEY="not secret",  # noqa: S106 - a test site's
        ALLOWED_HOSTS=["testserver", "127.0.0.1"],
        USE_TZ=True,
        ROOT_URLCONF="tests.integrations.django_urls",
        INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
                        "django.contrib.sessions", "django.contrib.messages", "ostinato.django"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.middleware.common.CommonMiddleware",
                    "django.middleware.csrf.CsrfViewMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware",
                    "django.contrib.messages.middleware.MessageMiddleware"],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
                    "OPTIONS": {"context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages"]}}],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{tmp}/db.sqlite3"}},
        OSTINATO={"APP": "site", "COORDINATOR": url, **ostinato},
    )
    django.setup()
    call_command("migrate", verbosity=0)


@contextmanager
def runner() -> Iterator[None]:
    """The project's app with a loop, run from a thread of this process until the block ends;
    entered once its lease is held (and ``ODD`` was held once, and released)."""
    from ostinato.django import get_app

    app = get_app()
    stop = threading.Event()
    asyncio.run(_held_once(app.coordinator_url(), ODD))

    @app.loop(every="100ms")
    def tick(ctx: Any) -> None:
        """Nothing to do."""

    async def serve() -> None:
        async with app.running(wait=True):
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="site-runner")
    thread.start()
    try:
        wait_for(lambda: all(loops().get(key, {}).get("holder") for key in KEYS))
        yield
    finally:
        stop.set()
        thread.join(30)


async def _held_once(url: str, key: str) -> None:
    from ostinato.coordinators import Grant, RunnerInfo, from_url

    store, holder = from_url(url), RunnerInfo.here()
    try:
        await store.open()
        grant = await store.acquire(key, holder, 60)
        assert isinstance(grant, Grant)
        await store.release(key, holder, grant.fence)
    finally:
        await store.close()


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def loops() -> dict[str, Any]:
    """The coordinator's loops, by key: ``paused``, ``holder``, ``fence``."""
    from django.conf import settings

    return read_loops(settings.OSTINATO["COORDINATOR"])


def read_loops(url: str) -> dict[str, Any]:
    """``loops()`` from any process (and from inside an event loop, as Playwright's): straight
    from the coordinator at ``url``."""
    from ostinato.coordinators import from_url
    from ostinato.operate import run_sync

    async def read() -> dict[str, Any]:
        store = from_url(url)
        try:
            await store.open()
            return {r.key: {"paused": r.paused, "holder": r.holder, "fence": r.fence}
                    for r in await store.loops()}
        finally:
            await store.close()

    return run_sync(read())


def user(name: str, *, staff: bool = False, superuser: bool = False, perms: tuple[str, ...] = (),
         groups: tuple[str, ...] = ()) -> Any:
    from django.contrib.auth.models import Group, Permission, User

    made = User.objects.create_user(name, password="pw",  # noqa: S106 - a test user's
                                    is_staff=staff, is_superuser=superuser)
    for codename in perms:
        made.user_permissions.add(Permission.objects.get(codename=codename))
    for group in groups:
        made.groups.add(Group.objects.get_or_create(name=group)[0])
    return made


@contextmanager
def client(who: Any = None) -> Iterator[Any]:
    """A test client that checks CSRF as browsers meet it, logged in as ``who`` if given."""
    from django.test import Client

    made = Client(enforce_csrf_checks=True)
    if who is not None:
        made.force_login(who)
    yield made


def answer(response: Any) -> dict[str, Any]:
    """A response's status, where it redirects, its JSON if it is JSON, and its text."""
    body = response.content.decode() if not getattr(response, "streaming", False) \
        else b"".join(response.streaming_content).decode()
    out: dict[str, Any] = {"status": response.status_code, "location": response.get("Location"),
                           "type": response.get("Content-Type", ""), "text": body,
                           "csp": response.get("Content-Security-Policy")}
    if out["type"].startswith("application/json"):
        out["json"] = json.loads(body)
    return out


def csrf_of(page: dict[str, Any]) -> str:
    """The CSRF token a page carries (the dashboard's meta tag, or the admin's form field)."""
    found = re.search(r'name="(?:ostinato-csrf-token|csrfmiddlewaretoken)" (?:content|value)="([^"]+)"',
                      page["text"])
    assert found, page["text"][:500]
    return found.group(1)


# -- scenarios -----------------------------------------------------------------------------


def staff_sees_the_page(tmp: Path) -> dict[str, Any]:
    """A staff user gets the page, its files and the loops' JSON; controls are on."""
    with client(user("staff", staff=True)) as staff:
        return {
            "page": answer(staff.get("/ostinato/")),
            "no_slash": answer(staff.get("/ostinato")),
            "js": answer(staff.get("/ostinato/static/dashboard.js")),
            "css": answer(staff.get("/ostinato/static/dashboard.css")),
            "session_js": answer(staff.get("/ostinato/static/django.js")),
            "missing": answer(staff.get("/ostinato/static/nothing.js")),
            "loops": answer(staff.get("/ostinato/api/loops", {"expand": "site:sync"})),
            "coordinator": loops(),
        }


def others_are_refused(tmp: Path) -> dict[str, Any]:
    """Anonymous visitors are sent to log in (the API answers 403); non-staff users get 403."""
    out: dict[str, Any] = {}
    with client() as anonymous:
        out["anonymous_page"] = answer(anonymous.get("/ostinato/"))
        out["anonymous_api"] = answer(anonymous.get("/ostinato/api/loops"))
        out["anonymous_asset"] = answer(anonymous.get("/ostinato/static/dashboard.js"))
    with client(user("someone")) as someone:
        out["user_page"] = answer(someone.get("/ostinato/"))
        out["user_api"] = answer(someone.get("/ostinato/api/loops"))
        token = someone.get("/admin/login/").cookies["csrftoken"].value
        out["user_pause"] = answer(someone.post("/ostinato/api/loops/site:tick/pause",
                                                HTTP_X_CSRFTOKEN=token))
    out["coordinator"] = loops()
    return out


def staff_pauses_and_resumes(tmp: Path) -> dict[str, Any]:
    """Pause and resume through the mounted URLs with the page's CSRF token; without it, 403."""
    out: dict[str, Any] = {}
    with client(user("staff", staff=True)) as staff:
        token = csrf_of(answer(staff.get("/ostinato/")))
        out["no_token"] = answer(staff.post("/ostinato/api/loops/site:tick/pause"))
        out["wrong_token"] = answer(staff.post("/ostinato/api/loops/site:tick/pause",
                                               HTTP_X_CSRFTOKEN="x" * 32))
        out["after_refusals"] = loops()
        out["pause"] = answer(staff.post("/ostinato/api/loops/site:tick/pause", HTTP_X_CSRFTOKEN=token))
        out["paused"] = loops()
        out["state"] = answer(staff.get("/ostinato/api/loops"))
        out["resume"] = answer(staff.post("/ostinato/api/loops/site:tick/resume", HTTP_X_CSRFTOKEN=token))
        out["resumed"] = loops()
        # As the page's script encodes a key: a slash in it does not end the key.
        out["pause_odd_key"] = answer(staff.post("/ostinato/api/loops/site%3Async%5Ba%2Fb%5D/pause",
                                                 HTTP_X_CSRFTOKEN=token))
        wait_for(lambda: loops()["site:tick"]["holder"])  # taken again since the resume
        out["held"] = loops()
        out["release"] = answer(staff.post("/ostinato/api/loops/site:tick/release", HTTP_X_CSRFTOKEN=token))
        wait_for(lambda: loops()["site:tick"]["fence"] > out["held"]["site:tick"]["fence"])
        out["released"] = loops()
        out["unknown_loop"] = answer(staff.post("/ostinato/api/loops/site:nope/pause",
                                                HTTP_X_CSRFTOKEN=token))
        out["unknown_action"] = answer(staff.post("/ostinato/api/loops/site:tick/explode",
                                                  HTTP_X_CSRFTOKEN=token))
        out["get_action"] = answer(staff.get("/ostinato/api/loops/site:tick/pause"))
    out["coordinator"] = loops()
    return out


def access_is_configurable(tmp: Path) -> dict[str, Any]:
    """``DASHBOARD_ACCESS`` names the project's own rule; ``DASHBOARD_CONTROL = None``: read-only."""
    out: dict[str, Any] = {}
    with client(user("staff", staff=True)) as staff:
        out["staff_page"] = answer(staff.get("/ostinato/"))
    with client(user("operator", groups=("ops",))) as operator:
        page = answer(operator.get("/ostinato/"))
        out["ops_page"] = page
        out["ops_api"] = answer(operator.get("/ostinato/api/loops"))
        out["ops_pause"] = answer(operator.post("/ostinato/api/loops/site:tick/pause",
                                                HTTP_X_CSRFTOKEN=csrf_of(page)))
    out["coordinator"] = loops()
    return out


def admin_lists_and_pauses(tmp: Path) -> dict[str, Any]:
    """The admin's index links to the loops; the list shows them; pause and resume are logged."""
    from django.contrib.admin.models import LogEntry

    out: dict[str, Any] = {}
    with client(user("root", staff=True, superuser=True)) as root:
        out["index"] = answer(root.get("/admin/"))
        out["listed"] = loops()
        listed = answer(root.get("/admin/ostinato/loop/"))
        out["list"] = listed
        token = csrf_of(listed)
        out["no_token"] = answer(root.post("/admin/ostinato/loop/act/",
                                           {"key": "site:tick", "action": "pause"}))
        out["pause"] = answer(root.post("/admin/ostinato/loop/act/", {
            "key": "site:tick", "action": "pause", "csrfmiddlewaretoken": token}))
        out["paused"] = loops()
        out["list_paused"] = answer(root.get("/admin/ostinato/loop/"))
        out["resume"] = answer(root.post("/admin/ostinato/loop/act/", {
            "key": "site:tick", "action": "resume", "csrfmiddlewaretoken": token}))
        out["resumed"] = loops()
        out["log"] = [(e.user.username, e.object_id, e.change_message)
                      for e in LogEntry.objects.order_by("id")]
        out["no_add"] = answer(root.get("/admin/ostinato/loop/add/"))
    with client(user("viewer", staff=True, perms=("view_loop",))) as viewer:
        out["viewer_list"] = answer(viewer.get("/admin/ostinato/loop/"))
        token = csrf_of(out["viewer_list"])
        out["viewer_pause"] = answer(viewer.post("/admin/ostinato/loop/act/", {
            "key": "site:tick", "action": "pause", "csrfmiddlewaretoken": token}))
    with client(user("plain_staff", staff=True)) as plain:
        out["plain_index"] = answer(plain.get("/admin/"))
        out["plain_list"] = answer(plain.get("/admin/ostinato/loop/"))
    out["coordinator"] = loops()
    return out


def serve(tmp: str) -> None:
    """Serve the site over HTTP on a free port (printed as ``serving http://...``), with the
    runner and a staff user ``staff`` (password ``pw``), until the process is killed."""
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application

    _configure(tmp, {})
    user("staff", staff=True)
    httpd = ThreadedWSGIServer(("127.0.0.1", 0), WSGIRequestHandler)
    httpd.set_app(get_wsgi_application())
    with runner():
        print(f"serving http://127.0.0.1:{httpd.server_address[1]}", flush=True)
        httpd.serve_forever()


if __name__ == "__main__":
    import sys

    serve(sys.argv[1])
