"""``python -m ostinato``: the same as the ``ostinato`` command."""

from __future__ import annotations

from ostinato.cli import main

main()
