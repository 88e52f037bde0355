"""Where a portal's pages could let a key out, in Debian's headless Chromium (Playwright)
against a real cortex process: the sign-in form sent by the browser itself (its script off,
blocked or not loaded yet) used to be a GET, which put the API key in the URL (the address
bar, the history, a proxy's access log)."""

from __future__ import annotations


import pytest

from browser import CHROMIUM, expect, sync_api
from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

PORTALS = """
[portals.acme]
name = "Acme AI"
listen = ["127.0.0.1:0"]
auth = "keys"
"""


@pytest.fixture(scope="module")
def cortex(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with ProcGroup(tmp_path_factory.mktemp("web-secrets")) as procs:
        yield procs.cortex(config=PORTALS, extra_args=["--log-level", "debug"])


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_a_sign_in_sent_without_the_pages_script_keeps_the_key_out_of_the_url(
        browser, cortex: Cortex) -> None:  # noqa: ANN001
    made = cortex.admin("POST", "/admin/keys", json={"portal": "acme", "name": "web"})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    signin = cortex.portal_urls["acme"][0] + "/portal/"

    context = browser.new_context(java_script_enabled=False)  # scripts off, or blocked
    page = context.new_page()
    page.goto(signin)
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("needs this page's script")
    assert key not in page.url and "key=" not in page.url
    assert key not in page.content()  # nor is it sent back
    context.close()

    page = browser.new_page()  # with its script, the sign-in works as before
    page.goto(signin)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(signin + "playground")
    page.close()
    assert key[-43:] not in cortex.log()
