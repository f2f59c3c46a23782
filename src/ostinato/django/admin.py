"""The loops in the Django admin: a read-only list with pause and resume buttons.

``ostinato > Loops`` in the admin's index lists every loop of the coordinator (state,
holder, fence, last pass), read from the coordinator on each visit. Seeing it takes
``ostinato.view_loop``, pausing and resuming ``ostinato.change_loop`` (superusers have
both); each pause and resume is written to the admin's log under the user's name.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin, messages  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured, PermissionDenied  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect  # type: ignore[import-untyped]
from django.template import engines  # type: ignore[import-untyped]
from django.template.backends.django import DjangoTemplates  # type: ignore[import-untyped]
from django.template.response import TemplateResponse  # type: ignore[import-untyped]
from django.urls import NoReverseMatch, URLPattern, path, reverse  # type: ignore[import-untyped]

from ostinato import control
from ostinato.django.models import Loop
from ostinato.django.watch import call
from ostinato.errors import OstinatoError

log = logging.getLogger("ostinato.django")

#: The admin's actions on a loop (``release`` and ``wake`` are on the dashboard and the CLI).
ACTIONS = {"pause": control.pause, "resume": control.resume}

#: The page, rendered by the project's Django template engine so that it extends the
#: project's own admin templates (kept here rather than in a template folder: the
#: package ships only its Python files and the dashboard's assets).
TEMPLATE = """\
{% extends "admin/base_site.html" %}
{% load i18n %}
{% block title %}{{ title }} | {{ site_title|default:_("Django site admin") }}{% endblock %}
{% block breadcrumbs %}
<div class="breadcrumbs">
<a href="{% url "admin:index" %}">{% translate "Home" %}</a>
&rsaquo; <a href="{% url "admin:app_list" app_label=opts.app_label %}">{{ opts.app_config.verbose_name }}</a>
&rsaquo; {{ opts.verbose_name_plural|capfirst }}
</div>
{% endblock %}
{% block content %}
<div id="content-main">
  <p>{{ coordinator }}{% if dashboard_url %}
    &middot; <a href="{{ dashboard_url }}">live dashboard</a>{% endif %}</p>
  {% if error %}<p class="errornote">{{ error }}</p>{% endif %}
  <div class="results">
  <table id="result_list">
    <thead><tr>
      <th scope="col">loop</th><th scope="col">state</th><th scope="col">holder</th>
      <th scope="col">fence</th><th scope="col">last pass</th><th scope="col">passes</th>
      <th scope="col">errors</th><th scope="col">last error</th>
      {% if can_change %}<th scope="col"></th>{% endif %}
    </tr></thead>
    <tbody>
    {% for loop in loops %}
      <tr data-key="{{ loop.key }}">
        <th class="field-key">{{ loop.key }}</th>
        <td class="field-state">{{ loop.state }}</td>
        <td class="field-holder">{{ loop.holder|default:"-" }}</td>
        <td class="field-fence">{{ loop.fence }}</td>
        <td class="field-last-pass">{% if loop.last_pass %}{{ loop.last_pass }}
          {% if loop.took %}({{ loop.took }}){% endif %}{% else %}-{% endif %}</td>
        <td class="field-passes">{{ loop.passes }}</td>
        <td class="field-errors">{{ loop.errors }}</td>
        <td class="field-last-error" title="{{ loop.last_error|default:"" }}">
          {{ loop.last_error|default:"-"|truncatechars:80 }}</td>
        {% if can_change %}<td class="field-action">
          <form method="post" action="{{ act_url }}">{% csrf_token %}
            <input type="hidden" name="key" value="{{ loop.key }}">
            {% if loop.paused %}
            <button type="submit" name="action" value="resume">resume</button>
            {% else %}
            <button type="submit" name="action" value="pause">pause</button>
            {% endif %}
          </form>
        </td>{% endif %}
      </tr>
    {% empty %}
      <tr><td colspan="9">No loops yet: start a runner with <code>manage.py ostinato run</code>.</td></tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
</div>
{% endblock %}
"""


def template() -> Any:
    """``TEMPLATE`` compiled by the project's first Django template engine (the admin needs one)."""
    for engine in engines.all():
        if isinstance(engine, DjangoTemplates):
            return engine.from_string(TEMPLATE)
    raise ImproperlyConfigured("the ostinato admin page needs a DjangoTemplates engine in TEMPLATES")


def row(loop: dict[str, Any]) -> dict[str, Any]:
    """A status row (``ostinato status --json``) as the page shows it."""
    ended = loop["last_end"] or loop["last_start"]
    took = loop["last_duration"]
    return {
        **loop,
        "key": f"{loop['app']}:{loop['loop']}",
        "paused": loop["state"] == "paused",
        "last_pass": datetime.fromtimestamp(ended, UTC) if ended else None,
        "took": f"{took * 1000:.3g} ms" if took is not None and took < 1 else
                f"{took:.3g} s" if took is not None else None,
    }


@admin.register(Loop)
class LoopAdmin(admin.ModelAdmin):  # type: ignore[misc]  # Django ships no type hints
    """The list of loops and its two buttons; nothing to add, change or delete."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        return [
            path("", self.admin_site.admin_view(self.changelist_view), name="{}_{}_changelist".format(*info)),
            path("act/", self.admin_site.admin_view(self.act_view), name="{}_{}_act".format(*info)),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None
                        ) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        loops: list[dict[str, Any]] = []
        error = None
        from ostinato.django import get_app

        coordinator = get_app().coordinator_url()
        try:
            loops = [row(loop) for loop in call(control.status)]
        except OstinatoError as exc:
            error = f"cannot read the coordinator: {exc}"
        try:
            dashboard_url = reverse("ostinato:dashboard")
        except NoReverseMatch:
            dashboard_url = None
        context = {
            **self.admin_site.each_context(request),
            "title": "Loops",
            "subtitle": None,
            "opts": self.opts,
            "loops": loops,
            "error": error,
            "coordinator": coordinator,
            "dashboard_url": dashboard_url,
            "can_change": self.has_change_permission(request),
            "act_url": reverse(f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_act"),
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, template(), context)

    def act_view(self, request: HttpRequest) -> HttpResponse:
        """POST ``key`` and ``action`` (``pause`` or ``resume``); back to the list with a message."""
        if request.method != "POST":
            return HttpResponse(status=405, headers={"Allow": "POST"})
        if not self.has_change_permission(request):
            raise PermissionDenied
        key, action = request.POST.get("key", ""), request.POST.get("action", "")
        back = HttpResponseRedirect(
            reverse(f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_changelist")
        )
        if action not in ACTIONS:
            self.message_user(request, f"unknown action {action!r}", messages.ERROR)
            return back
        try:
            done = call(lambda store: ACTIONS[action](store, key))
        except OstinatoError as exc:
            self.message_user(request, f"{action} {key}: {exc}", messages.ERROR)
            return back
        self.log_change(request, Loop(key=done), f"{action}d")
        log.info("admin: %sd %s, by %s", action, done, request.user.get_username())
        self.message_user(request, f"{action}d {done}", messages.SUCCESS)
        return back
