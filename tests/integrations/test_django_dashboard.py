"""The dashboard mounted in a Django URL conf and the loops in Django's admin, through Django's
test client on a site of their own (``django_site``: one process per test), on SQLite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ostinato.django.conf import RULES, read, who_may
from ostinato.errors import ConfigurationError
from tests.integrations import django_site
from tests.integrations.django_site import site
from tests.observe.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_a_staff_user_gets_the_page_its_files_and_the_loops_under_the_prefix(tmp_path: Path) -> None:
    """/ostinato/ is the standalone page plus the CSRF token and django.js; api/loops is its JSON."""
    seen = site(django_site.staff_sees_the_page, tmp_path)
    page = seen["page"]
    assert page["status"] == 200
    assert '<table id="loops">' in page["text"]  # the dashboard's own page
    assert '<meta name="ostinato-csrf-token" content="' in page["text"]
    assert '<meta name="ostinato-csrf-header" content="X-CSRFTOKEN">' in page["text"]
    assert page["text"].index('src="static/django.js"') < page["text"].index("</head>")
    assert page["csp"] == "default-src 'self'; img-src 'self' data:"
    assert seen["no_slash"]["status"] in (301, 302)  # APPEND_SLASH, or the page's own redirect
    assert seen["no_slash"]["location"] == "/ostinato/"
    assert seen["js"]["status"] == seen["css"]["status"] == seen["session_js"]["status"] == 200
    assert "polls api/loops" in seen["js"]["text"]
    assert "headers.set(header, csrf)" in seen["session_js"]["text"]
    assert seen["missing"]["status"] == 404
    answer = seen["loops"]["json"]
    assert answer["control"] is True
    assert answer["coordinator"] == f"sqlite:///{tmp_path}/ostinato.db"
    rows = {row["key"]: row for row in answer["loops"]}
    # The key is a member of its loop: one row for the loop, then the member (expand=site:sync).
    assert set(rows) == {*django_site.KEYS, "site:sync", django_site.ODD}
    assert rows["site:sync"]["group"]["count"] == 1
    assert rows[django_site.ODD]["parent"] == "site:sync"
    for key, row in rows.items():
        if key == "site:sync":
            continue
        assert row["holder"] == seen["coordinator"][key]["holder"]
        assert row["fence"] == seen["coordinator"][key]["fence"]


def test_anonymous_visitors_are_sent_to_log_in_and_non_staff_users_are_refused(tmp_path: Path) -> None:
    """Not logged in: the page redirects to the admin's login, the API and files answer 403;
    logged in without is_staff: 403 everywhere, and a pause changes nothing."""
    seen = site(django_site.others_are_refused, tmp_path)
    assert seen["anonymous_page"]["status"] == 302
    assert seen["anonymous_page"]["location"] == "/admin/login/?next=/ostinato/"
    assert seen["anonymous_api"]["status"] == 403
    assert seen["anonymous_api"]["json"]["error"].startswith("not logged in")
    assert seen["anonymous_asset"]["status"] == 302
    assert seen["user_page"]["status"] == 403
    assert seen["user_api"]["status"] == 403
    assert seen["user_api"]["json"]["error"].startswith("not allowed")
    assert seen["user_pause"]["status"] == 403
    assert seen["coordinator"]["site:tick"]["paused"] is False


def test_a_pause_through_the_mounted_url_changes_the_coordinator_and_needs_the_csrf_token(
    tmp_path: Path,
) -> None:
    """With the page's token: pause, resume, release act on the coordinator; without it, or with a
    wrong one, Django refuses the POST and the loop stays as it was."""
    seen = site(django_site.staff_pauses_and_resumes, tmp_path)
    assert seen["no_token"]["status"] == 403
    assert "CSRF" in seen["no_token"]["text"]
    assert seen["wrong_token"]["status"] == 403
    assert seen["after_refusals"]["site:tick"]["paused"] is False
    assert seen["pause"]["status"] == 200
    assert seen["pause"]["json"] == {"ok": True, "action": "pause", "loop": "site:tick"}
    assert seen["paused"]["site:tick"]["paused"] is True
    states = {row["key"]: row["state"] for row in seen["state"]["json"]["loops"]}
    assert states["site:tick"] == "paused"
    assert seen["resume"]["status"] == 200
    assert seen["resumed"]["site:tick"]["paused"] is False
    assert seen["pause_odd_key"]["json"]["loop"] == django_site.ODD
    assert seen["coordinator"][django_site.ODD]["paused"] is True
    assert seen["release"]["json"]["fence"] == seen["held"]["site:tick"]["fence"]
    assert seen["released"]["site:tick"]["fence"] > seen["held"]["site:tick"]["fence"]  # taken over
    assert seen["unknown_loop"]["status"] == 404
    assert "no loop named 'site:nope'" in seen["unknown_loop"]["json"]["error"]
    assert seen["unknown_action"]["status"] == 404
    assert seen["get_action"]["status"] == 405


def test_who_may_see_and_control_the_dashboard_is_a_setting(tmp_path: Path) -> None:
    """DASHBOARD_ACCESS as the dotted path of the project's rule lets the ops group in and keeps
    other staff out; DASHBOARD_CONTROL = None makes the page read-only and refuses a pause."""
    seen = site(django_site.access_is_configurable, tmp_path,
                DASHBOARD_ACCESS="tests.integrations.django_site.ops_only", DASHBOARD_CONTROL=None)
    assert seen["staff_page"]["status"] == 403
    assert seen["ops_page"]["status"] == 200
    assert seen["ops_api"]["json"]["control"] is False
    assert seen["ops_pause"]["status"] == 403
    assert "read-only" in seen["ops_pause"]["json"]["error"]
    assert seen["coordinator"]["site:tick"]["paused"] is False


def test_the_dashboard_settings_are_checked() -> None:
    """A rule that is neither a name, a function nor an importable path is a ConfigurationError."""
    assert who_may("DASHBOARD_ACCESS", "superuser") is RULES["superuser"]
    assert who_may("DASHBOARD_ACCESS", "tests.integrations.django_site.ops_only") is django_site.ops_only
    assert read({"DASHBOARD_CONTROL": None}, {}).dashboard_control is None
    with pytest.raises(ConfigurationError, match="write 'staff', 'superuser' or the dotted path"):
        read({"DASHBOARD_ACCESS": "admins"}, {})
    read({"DASHBOARD_CONTROL": "tests.nowhere.rule"}, {})  # imported on use (and by the checks)
    with pytest.raises(ConfigurationError, match=r"cannot import 'tests\.nowhere\.rule'"):
        who_may("DASHBOARD_CONTROL", "tests.nowhere.rule")
    with pytest.raises(ConfigurationError, match="must be 'staff', 'superuser', a function"):
        read({"DASHBOARD_ACCESS": 3}, {})
    with pytest.raises(ConfigurationError, match="DASHBOARD_ACCESS'] cannot be None"):
        read({"DASHBOARD_ACCESS": None}, {})


def test_the_admin_lists_the_loops_and_pauses_them_with_the_admin_permissions(tmp_path: Path) -> None:
    """The admin's index links to ostinato > Loops; the list shows state, holder and fence; a
    superuser pauses and resumes (CSRF-checked, logged); view_loop alone sees no buttons and
    cannot pause; staff without either permission get 403."""
    seen = site(django_site.admin_lists_and_pauses, tmp_path)
    assert seen["index"]["status"] == 200
    assert 'href="/admin/ostinato/loop/"' in seen["index"]["text"]
    listed = seen["list"]
    assert listed["status"] == 200
    tick = seen["listed"]["site:tick"]
    row = listed["text"].split('data-key="site:tick"')[1].split("</tr>")[0]
    assert '<td class="field-state">running</td>' in row
    assert f'<td class="field-holder">{tick["holder"]}</td>' in row
    assert f'<td class="field-fence">{tick["fence"]}</td>' in row
    assert 'value="pause"' in row
    assert seen["no_token"]["status"] == 403
    assert (seen["pause"]["status"], seen["pause"]["location"]) == (302, "/admin/ostinato/loop/")
    assert seen["paused"]["site:tick"]["paused"] is True
    row = seen["list_paused"]["text"].split('data-key="site:tick"')[1].split("</tr>")[0]
    assert '<td class="field-state">paused</td>' in row
    assert 'value="resume"' in row
    assert '<li class="success">Paused site:tick</li>' in seen["list_paused"]["text"]
    assert seen["resumed"]["site:tick"]["paused"] is False
    assert seen["log"] == [("root", "site:tick", "paused"), ("root", "site:tick", "resumed")]
    assert seen["no_add"]["status"] == 404
    assert seen["viewer_list"]["status"] == 200
    assert 'value="pause"' not in seen["viewer_list"]["text"]
    assert seen["viewer_pause"]["status"] == 403
    assert seen["coordinator"]["site:tick"]["paused"] is False
    assert "/admin/ostinato/loop/" not in seen["plain_index"]["text"]
    assert seen["plain_list"]["status"] == 403


@pytest.fixture
def served_site(tmp_path: Path) -> Iterator[str]:
    """``django_site`` served over HTTP by a process of its own; yields its base URL."""
    log = tmp_path / "site.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.integrations.django_site", str(tmp_path)],
                                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        def address() -> str | None:
            assert proc.poll() is None, log.read_text()
            found = re.search(r"serving (http://\S+)", log.read_text())
            return found.group(1) if found else None

        yield wait_for(address, timeout=60, what="the site to serve")
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.browser
def test_in_a_browser_a_staff_user_logs_in_and_pauses_a_loop_from_the_mounted_page(
    served_site: str, browser: Any, tmp_path: Path,
) -> None:
    """In Chromium: /ostinato/ sends to the admin's login and back; the rows come in; the
    buttons are on without a token form, and pause and resume reach the coordinator (the
    page's POSTs carry Django's CSRF token, or Django would refuse them)."""
    from playwright.sync_api import expect

    def paused() -> bool:
        return bool(django_site.read_loops(f"sqlite:///{tmp_path}/ostinato.db")["site:tick"]["paused"])

    page = browser.new_page()
    errors: list[str] = []
    try:
        page.goto(f"{served_site}/ostinato/")
        assert "/admin/login/" in page.url
        page.fill("#id_username", "staff")
        page.fill("#id_password", "pw")
        page.click("input[type=submit]")
        page.wait_for_url(f"{served_site}/ostinato/")
        # From here on (the login page's own scripts are not served: the site has no static files).
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.reload()
        tick = page.locator('tr[data-key="site:tick"]')
        expect(tick.locator("td.state")).to_have_text("running", timeout=10_000)
        expect(page.locator("#mode")).to_have_text("controls on")
        expect(page.locator("#auth")).to_be_hidden()
        pause = tick.locator('button[data-action="pause"]')
        expect(pause).to_be_enabled()
        pause.click()
        expect(tick).to_have_attribute("data-state", "paused", timeout=10_000)
        assert paused()
        tick.locator('button[data-action="resume"]').click()
        expect(tick).to_have_attribute("data-state", "running", timeout=10_000)
        assert not paused()
        expect(page.locator("#banner")).to_be_hidden()
    finally:
        page.close()
    assert errors == []
