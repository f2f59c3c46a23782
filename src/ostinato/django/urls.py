"""The dashboard in the project's URL conf, under a prefix of its choosing::

    urlpatterns = [
        ...,
        path("ostinato/", include("ostinato.django.urls")),
    ]

The page is then ``/ostinato/``, behind the project's login (``ostinato.django.views``).
"""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from ostinato.django import views

app_name = "ostinato"

urlpatterns = [
    path("", views.page, name="dashboard"),
    path("static/<str:name>", views.asset, name="asset"),
    path("api/loops", views.loops, name="loops"),
    # A key may hold any character (app:sync[a/b]): the action is the last segment.
    path("api/loops/<path:key>/<str:action>", views.act, name="act"),
]
