"""The URL conf of ``django_site``: the admin, and the dashboard under ``/ostinato/``."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("ostinato/", include("ostinato.django.urls")),
]
