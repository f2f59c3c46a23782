"""Fixtures shared with the monitoring tests."""

from __future__ import annotations

from tests.observe.conftest import browser  # noqa: F401 - Debian's Chromium, driven by Playwright
