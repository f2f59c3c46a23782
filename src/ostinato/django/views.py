"""The dashboard's page and JSON API as Django views, behind the project's own login.

``path("ostinato/", include("ostinato.django.urls"))`` serves them; ``OSTINATO``'s
``DASHBOARD_ACCESS`` says who may see the page (active staff users by default) and
``DASHBOARD_CONTROL`` who may use its buttons. The page is the standalone
dashboard's own (``ostinato.dashboard``), with two additions in its ``<head>``: the
CSRF token, and ``django.js``, which sends that token with each button's POST in
place of the dashboard's bearer token, since here the session is the credential.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings as django_settings  # type: ignore[import-untyped]
from django.contrib.auth.views import redirect_to_login  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured, PermissionDenied  # type: ignore[import-untyped]
from django.http import (  # type: ignore[import-untyped]
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
)
from django.middleware.csrf import get_token  # type: ignore[import-untyped]
from django.urls import NoReverseMatch, reverse  # type: ignore[import-untyped]
from django.utils.html import format_html  # type: ignore[import-untyped]
from django.views.decorators.cache import never_cache  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_protect  # type: ignore[import-untyped]
from django.views.decorators.http import require_GET, require_POST  # type: ignore[import-untyped]

from ostinato import dashboard
from ostinato.django.watch import Watch
from ostinato.errors import OstinatoError, UnknownLoopError

log = logging.getLogger("ostinato.django")

View = Callable[..., HttpResponse]

#: The standalone dashboard's headers: no caching, scripts and styles from this origin only.
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
}
ACTIONS = (*dashboard.ACTIONS, "release")
#: The page's own files, by name (``static/<name>``).
ASSETS = {path.name: path for path in dashboard.STATIC.iterdir() if path.suffix in (".css", ".js")}

#: Makes the page's buttons use the session: ``X-CSRFToken`` (the header Django's
#: ``CSRF_HEADER_NAME`` names) on every POST, no ``Authorization`` header, the token
#: form hidden, and a read-only page that says why in Django's terms.
SESSION_JS = """\
// ostinato's dashboard mounted in a Django project: the login session is the credential.
"use strict";
(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const csrf = meta("ostinato-csrf-token");
  const header = meta("ostinato-csrf-header");
  const readOnly = meta("ostinato-read-only");
  // The page enables its buttons once it holds a token; the session stands for one here.
  sessionStorage.setItem("ostinato-dashboard-token", "django-session");
  const send = window.fetch.bind(window);
  window.fetch = (resource, init = {}) => {
    if (String(init.method || "GET").toUpperCase() !== "POST") return send(resource, init);
    const headers = new Headers(init.headers);
    headers.delete("Authorization");
    headers.set(header, csrf);
    return send(resource, { ...init, headers, credentials: "same-origin" });
  };
  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("auth").style.setProperty("display", "none", "important");
    const mode = document.getElementById("mode");
    const explain = () => {
      if (mode.textContent.startsWith("read-only") && mode.textContent !== readOnly) {
        mode.textContent = readOnly;
      }
    };
    new MutationObserver(explain).observe(mode, { childList: true, characterData: true, subtree: true });
  });
})();
"""

_watches: dict[str, Watch] = {}


def watch() -> Watch:
    """This process's ``Watch`` of the project's coordinator."""
    from ostinato.django import get_app

    url = get_app().coordinator_url()
    return _watches.setdefault(url, Watch())


def login_url() -> str:
    """Where an anonymous visitor is sent: ``LOGIN_URL`` when the project set it, else the
    admin's login page when the admin is routed (as ``staff_member_required`` does)."""
    if not django_settings.is_overridden("LOGIN_URL"):
        try:
            return str(reverse("admin:login"))
        except NoReverseMatch:
            pass
    return str(django_settings.LOGIN_URL)


def may_control(request: HttpRequest) -> bool:
    from ostinato.django import settings

    return settings().may_control(request.user)


def decorated(*decorators: Callable[[Any], Any]) -> Callable[[View], View]:
    """``decorators`` applied to a view, the first outermost (Django's decorators ship without type hints)."""

    def apply(view: View) -> View:
        for decorator in reversed(decorators):
            view = decorator(view)
        return view

    return apply


def guarded(*, api: bool) -> Callable[[View], View]:
    """Let in users ``DASHBOARD_ACCESS`` admits. Others: a visitor who is not logged in is sent
    to log in (the API answers 403 JSON instead), a logged-in user is refused with 403."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            from ostinato.django import settings

            user = getattr(request, "user", None)
            if user is None:
                raise ImproperlyConfigured(
                    "ostinato's dashboard needs Django's login: add django.contrib.auth and "
                    "django.contrib.sessions to INSTALLED_APPS, and their middleware to MIDDLEWARE"
                )
            if settings().may_see(user):
                return view(request, *args, **kwargs)
            if api:
                why = "not allowed" if user.is_authenticated else "not logged in"
                return JsonResponse({"error": f"{why}: log in as a user who may see ostinato's loops"},
                                    status=403, headers=HEADERS)
            if user.is_authenticated:
                raise PermissionDenied("ostinato's dashboard: this user may not see it")
            return redirect_to_login(request.get_full_path(), login_url())

        return wrapper

    return decorate


@decorated(never_cache, require_GET, guarded(api=False))
def page(request: HttpRequest) -> HttpResponse:
    """The dashboard page; its addresses are relative, so it is served at the prefix itself."""
    if not request.path.endswith("/"):  # its relative addresses need the slash
        return HttpResponseRedirect(request.path + "/")
    header = django_settings.CSRF_HEADER_NAME.removeprefix("HTTP_").replace("_", "-")
    head = format_html(
        '<meta name="ostinato-csrf-token" content="{}">\n'
        '  <meta name="ostinato-csrf-header" content="{}">\n'
        '  <meta name="ostinato-read-only" content="{}">\n'
        '  <script src="static/django.js"></script>\n',
        get_token(request), header,
        "read-only: this account may not pause, resume, wake or release loops",
    )
    return HttpResponse(dashboard.page_html(head), content_type="text/html; charset=utf-8",
                        headers=HEADERS)


@decorated(require_GET, guarded(api=False))
def asset(request: HttpRequest, name: str) -> HttpResponse:
    """The page's stylesheet and scripts: the standalone dashboard's files, and ``django.js``."""
    if name == "django.js":
        return HttpResponse(SESSION_JS, content_type="text/javascript; charset=utf-8", headers=HEADERS)
    if name not in ASSETS:
        raise Http404(f"no dashboard file {name!r}")
    return FileResponse(ASSETS[name].open("rb"), headers=HEADERS)


@decorated(never_cache, require_GET, guarded(api=True))
def loops(request: HttpRequest) -> HttpResponse:
    """``api/loops``: every loop of the coordinator, as the standalone dashboard answers."""
    try:
        answer = watch().snapshot(request.GET.getlist("expand"))
    except OstinatoError as exc:  # no coordinator can be made (a system check says so too)
        return JsonResponse({"error": str(exc)}, status=503, headers=HEADERS)
    answer["control"] = may_control(request)
    return JsonResponse(answer, headers=HEADERS)


@decorated(never_cache, require_POST, csrf_protect, guarded(api=True))
def act(request: HttpRequest, key: str, action: str) -> HttpResponse:
    """``api/loops/<key>/<action>``: pause, resume, wake or release loop ``key``."""
    if action not in ACTIONS:
        return JsonResponse({"error": f"unknown action {action!r}"}, status=404, headers=HEADERS)
    if not may_control(request):
        return JsonResponse({"error": "read-only: this account may not control loops "
                                      "(OSTINATO['DASHBOARD_CONTROL'])"}, status=403, headers=HEADERS)
    try:
        answer = watch().act(action, key)
    except UnknownLoopError as exc:
        return JsonResponse({"error": str(exc)}, status=404, headers=HEADERS)
    except OstinatoError as exc:
        return JsonResponse({"error": str(exc)}, status=503, headers=HEADERS)
    log.info("dashboard: %s %s, by %s", action, answer["loop"], request.user.get_username())
    return JsonResponse(answer, headers=HEADERS)
