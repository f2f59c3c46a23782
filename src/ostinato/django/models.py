"""``Loop``: the admin's handle on the loops, with no table behind it.

The loops live in the coordinator, and the admin page (``ostinato.django.admin``)
reads them from there. Django's admin lists only registered models in its index
and grants its permissions per model, so a model with ``managed = False`` is what
gives the page its place in the index and the ``ostinato.view_loop`` and
``ostinato.change_loop`` permissions. Nothing ever queries it: no table, no migration.
"""

from __future__ import annotations

from django.db import models  # type: ignore[import-untyped]


class Loop(models.Model):  # type: ignore[misc]  # Django ships no type hints
    """One loop of the coordinator, named by its key (``app:loop``)."""

    key = models.CharField(max_length=255, primary_key=True)

    class Meta:
        managed = False
        default_permissions = ("view", "change")  # change: pause and resume
        verbose_name = "loop"

    def __str__(self) -> str:
        return str(self.key)
