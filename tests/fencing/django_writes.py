"""Fenced writes through a Django connection, in a process of their own (Django is configured once
per process, so this keeps it apart from every other test's settings)."""

from __future__ import annotations

from typing import Any

import ostinato


def run(path: str) -> dict[str, Any]:
    """Fence 2 writes, then fence 1 is refused, inside ``transaction.atomic()`` and outside it."""
    import django
    from django.conf import settings

    settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": path}})
    django.setup()
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE data (seq INTEGER PRIMARY KEY AUTOINCREMENT, fence INTEGER)")
    with ostinato.fenced(connection, loop="app:loop", fence=2), connection.cursor() as cursor:
        cursor.execute("INSERT INTO data (fence) VALUES (2)")
    refused = []
    for fence in (1, 0):
        try:
            # The documented pattern: inside atomic(), the helper joins the block.
            with (transaction.atomic(), ostinato.fenced(connection, loop="app:loop", fence=fence),
                  connection.cursor() as cursor):
                cursor.execute("INSERT INTO data (fence) VALUES (%s)", [fence])
        except ostinato.StaleFence as exc:
            refused.append(exc.newer)
    with connection.cursor() as cursor:
        cursor.execute("SELECT fence FROM data ORDER BY seq")
        rows = [row[0] for row in cursor.fetchall()]
    return {"rows": rows, "refused": refused, "in_atomic": connection.in_atomic_block}
