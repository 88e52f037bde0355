"""The console's Usage page in a real browser (Debian's Chromium, driven by Playwright in a
thread while the gateway runs on trio in this process), against ledger rows written
beforehand. Skipped where Playwright or Chromium is missing, as ``tests/e2e/browser.py``
skips the end-to-end browser tests."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.portal.usage import UsageRecord
from portals import T0, acme, portals
from serving import ADMIN_TOKEN

sync_api = pytest.importorskip("playwright.sync_api", reason="the web tests drive Chromium with Playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)", allow_module_level=True)


async def test_the_usage_page_by_key_names_an_open_portals_rows_as_the_cli_does(tmp_path) -> None:
    """docs/web.md: an open portal's rows (``record_usage = true``) carry no key id; the
    page showed an empty Key cell, where ``helexa usage`` prints ``(open)``."""
    store = SqliteStore(tmp_path / "usage.sqlite")
    store.append([UsageRecord(request_id=f"r{i}", portal="acme", key_id=key_id, endpoint="chat", model_asked="fast",
                              model_served="chat", started_at=T0, ended_at=T0 + 1, prompt_tokens=3,
                              completion_tokens=4, cost=0.25, currency="EUR")
                  for i, key_id in enumerate(["", "k2", ""])])
    async with portals(Fleet(), {"acme": acme()}, store=store) as (gateway, urls):
        with trio.fail_after(60):
            await gateway.web._built.wait()
        base = urls["default"]

        def browse() -> tuple[list[str], str]:
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                try:
                    page = browser.new_page()
                    page.set_default_timeout(20_000)
                    page.goto(base + "/console/login")
                    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
                    page.get_by_role("button", name="Sign in").click()
                    sync_api.expect(page).to_have_url(re.compile(r"/console/fleet$"))
                    page.goto(base + "/console/usage?by=key")
                    cells = page.locator("#usage tbody tr td:first-child").all_inner_texts()
                    csv = page.request.get(base + "/console/usage.csv?by=key").text()
                    return cells, csv
                finally:
                    browser.close()

        cells, csv = await trio.to_thread.run_sync(browse)
    store.close()
    assert sorted(cells) == ["(open)", "k2"], cells
    assert "(open)" not in csv  # the export keeps the ledger's empty key id, as `helexa usage --csv` does
