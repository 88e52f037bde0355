"""What the browser tests share: Playwright's sync API, pointed at Debian's Chromium.

Imported by a test module, this skips the module where Playwright or Chromium is missing
(``pytest.skip`` at import time skips the importing module)."""

import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the web tests drive Chromium with Playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
                allow_module_level=True)
expect = sync_api.expect
