"""The web console and the portals' pages in a real headless Chromium (Debian's, driven by
Playwright), against real cortex and neuron processes.

One cortex serves the module: an open default portal (whose first socket also serves the
admin routes and the console), a keyed portal ``acme`` and an open portal ``beta`` with
another theme; its neuron ``n1`` joins at start. The catalogue holds a synthetic model
whose pretend load reports its progress in steps (``synth``) and SmolLM2 (``chat``).

Screenshots of each page go to ``$HELEXA_ARTIFACTS/web`` (else a pytest tmp dir); the set
shown in ``docs/web.md`` was copied from there.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from browser import CHROMIUM, expect, sync_api
from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
memory_mb = 10
[models."synth".config]
metadata = { tokens = 400, tokens_per_second = 40, load_seconds = 4, load_steps = 8 }

[models."smollm2-135m-instruct"]
backend = "llama_cpp"
memory_mb = 300
max_context = 2048
[models."smollm2-135m-instruct".config]
metadata = { n_ctx = 4096 }
"""

CONFIG = """
[portals.acme]
name = "Acme AI"
listen = ["127.0.0.1:0"]
auth = "keys"
aliases = { fast = "synth", chat = "smollm2-135m-instruct" }
theme = { colors = { primary = "#b00060", background = "#fff0f6" } }

[portals.beta]
name = "Beta Labs"
listen = ["127.0.0.1:0"]
models = ["synth"]
theme = { colors = { primary = "#0b6e4f", background = "#f0fff8" } }
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = os.environ.get("HELEXA_ARTIFACTS")
    path = Path(base) / "web" if base else tmp_path_factory.mktemp("web-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with ProcGroup(tmp_path_factory.mktemp("web")) as group:
        yield group


@pytest.fixture(scope="module")
def cortex(procs: ProcGroup) -> Cortex:
    c = procs.cortex(models=MODELS, config=CONFIG)
    procs.neuron(c, "n1")
    return c


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def login(browser, cortex: Cortex, **kw):  # noqa: ANN001, ANN201
    page = browser.new_page(viewport={"width": 1280, "height": 860}, **kw)
    page.set_default_timeout(20_000)
    page.goto(cortex.admin_url + "/console/")
    expect(page).to_have_url(re.compile(r"/console/login$"))
    page.get_by_label("Admin token").fill(cortex.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console/fleet$"))
    return page


def test_console_shows_a_neuron_join_and_a_load_progress_live_and_an_unload_changes_its_state(
        browser, cortex: Cortex, procs: ProcGroup, artifacts: Path) -> None:  # noqa: ANN001
    fleet = login(browser, cortex)
    expect(fleet.locator("article.neuron[data-node=n1]")).to_be_visible()
    fleet.wait_for_load_state("load")  # the sign-in's own navigation is over
    loads: list[str] = []
    fleet.on("load", lambda p: loads.append(p.url))

    n2 = procs.neuron(cortex, "n2", wait=False)
    card = fleet.locator("article.neuron[data-node=n2]")
    expect(card).to_be_visible()  # pushed: the page was not reloaded
    expect(card.locator("[data-field=health]")).to_have_text("healthy")

    models = browser.new_page(viewport={"width": 1280, "height": 860}, storage_state=fleet.context.storage_state())
    models.goto(cortex.admin_url + "/console/models")
    row = models.locator("tr[data-model=synth]")
    row.get_by_label("Neuron for synth").select_option("n2")
    row.get_by_role("button", name="Load", exact=True).click()
    expect(models.locator(".notice")).to_contain_text("Loading synth on n2")

    state = card.locator("li[data-model=synth] [data-field=state]")
    expect(state).to_have_text(re.compile(r"loading"))
    fleet.screenshot(path=artifacts / "console-fleet-loading.png")
    seen: list[str] = []  # what the page showed, as the pushed updates changed it
    deadline = time.monotonic() + 30
    while (text := state.inner_text()) != "loaded":
        if text not in seen:
            seen.append(text)
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    steps = [s for s in seen if re.fullmatch(r"loading [1-9]\d?%", s)]
    assert len(steps) >= 2, seen  # the progress moved on the page while we watched
    assert cortex.neuron_view("n2")["models"]["synth"]["state"] == "loaded"
    expect(models.locator("tr[data-model=synth] .where [data-node=n2]")).to_contain_text("loaded")
    models.screenshot(path=artifacts / "console-models.png", full_page=True)
    fleet.screenshot(path=artifacts / "console-fleet.png")

    row = models.locator("tr[data-model=synth]")
    row.get_by_label("Neuron for synth").select_option("n2")
    row.get_by_role("button", name="Unload", exact=True).click()
    expect(card.locator("li[data-model=synth] [data-field=state]")).not_to_have_text("loaded")
    cortex.wait_for(lambda f: next(n for n in f["neurons"] if n["node_id"] == "n2")["models"]
                    .get("synth", {}).get("state") != "loaded", "synth unloaded from n2")
    assert loads == [], loads  # everything above arrived pushed, without a reload
    models.close()
    fleet.close()
    n2.stop(10)


def test_the_models_page_says_why_each_request_went_where_it_went(browser, cortex: Cortex,
                                                                   artifacts: Path) -> None:  # noqa: ANN001
    with openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
        for question in ("first", "second"):
            client.chat.completions.create(model="synth", max_tokens=2, messages=[{"role": "user", "content": question}])
    page = login(browser, cortex)
    page.get_by_role("link", name="Models").click()
    table = page.get_by_role("table", name="Routing decisions")
    rows = table.locator("tr[data-route-model=synth]")
    expect(rows.first).to_be_visible()
    newest = rows.first  # the second request: synth was resident by then
    expect(newest).to_have_attribute("data-mode", "local")
    expect(newest).to_contain_text(re.compile(r"n\d"))
    expect(newest.locator("td.cache")).to_have_text(re.compile(r"hit \d+/\d+ blocks|miss|session"))
    assert rows.count() >= 2
    page.screenshot(path=artifacts / "console-routing.png", full_page=True)
    page.close()


def test_a_key_created_in_the_console_works_with_openai_rotated_and_revoked_there(
        browser, cortex: Cortex, artifacts: Path) -> None:  # noqa: ANN001
    page = login(browser, cortex)
    page.get_by_role("link", name="Portals & keys").click()
    page.get_by_label("Portal", exact=True).select_option("acme")
    page.get_by_label("Name").fill("browser-made")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_label("API key").input_value()
    assert key.startswith("sk-hlx-")
    key_id = key[len("sk-hlx-"):].split("_")[0]
    page.screenshot(path=artifacts / "console-keys.png")

    acme = cortex.portal_urls["acme"][0]
    with openai.OpenAI(base_url=acme + "/v1", api_key=key, max_retries=0, timeout=30) as client:
        answer = client.chat.completions.create(model="fast", max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content.startswith("tok0")

        page.goto(cortex.admin_url + "/console/keys")
        expect(page.get_by_label("API key")).to_have_count(0)  # never shown again
        assert key not in page.content()
        page.get_by_role("button", name=f"Rotate key {key_id}").click()
        rotated = page.get_by_label("API key").input_value()
        assert rotated != key and rotated.startswith(f"sk-hlx-{key_id}_")  # same id, new secret
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="fast", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=acme + "/v1", api_key=rotated, max_retries=0, timeout=30) as client:
        assert client.chat.completions.create(model="fast", max_tokens=4, messages=[
            {"role": "user", "content": "hi"}]).choices[0].message.content.startswith("tok0")
        page.goto(cortex.admin_url + "/console/keys")
        page.get_by_role("button", name=f"Revoke key {key_id}").click()
        expect(page.locator(f"tr[data-key='{key_id}'] .status-revoked")).to_have_text("revoked")
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="fast", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    page.goto(cortex.admin_url + "/console/usage?by=key")
    expect(page.locator("#usage")).to_contain_text(key_id)
    page.screenshot(path=artifacts / "console-usage.png", full_page=True)
    page.goto(cortex.admin_url + "/console/traffic")
    expect(page.locator("#traffic section.chart").first).to_be_visible()
    page.screenshot(path=artifacts / "console-traffic.png", full_page=True)
    page.goto(cortex.admin_url + "/console/mesh")
    expect(page.locator("main")).to_contain_text("Mesh off")
    page.close()


def test_without_the_admin_token_only_the_login_page_shows_and_every_action_refuses(
        browser, cortex: Cortex, artifacts: Path) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 390, "height": 760})
    for path in ("/console/", "/console/fleet", "/console/models", "/console/traffic", "/console/keys",
                 "/console/usage", "/console/mesh"):
        page.goto(cortex.admin_url + path)
        expect(page).to_have_url(re.compile(r"/console/login$"))
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not the operator's admin token")
    page.screenshot(path=artifacts / "console-login.png")
    page.close()

    admin = cortex.admin_url
    actions = [("POST", "/console/keys", {"portal": "acme", "name": "x"}),
               ("POST", "/console/keys/0123456789abcdef/revoke", {}),
               ("POST", "/console/keys/0123456789abcdef/rotate", {}),
               ("POST", "/console/models", {"action": "unload", "model": "synth", "node": "n1"}),
               ("POST", "/console/logout", {}), ("GET", "/console/events", None), ("GET", "/console/usage.csv", None)]
    for method, path, form in actions:
        r = httpx.request(method, admin + path, data=form, cookies={"helexa_console": "forged"}, timeout=10)
        assert r.status_code == 401, (path, r.status_code)
        assert "Traceback" not in r.text
    # A session without the form's CSRF token is refused too.
    with httpx.Client(base_url=admin, timeout=10) as c:
        signed_in = c.post("/console/login", data={"token": cortex.admin_token})
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        assert all(flag in cookie for flag in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/console"))
        session = {"cookie": cookie.split(";")[0]}  # httpx keeps a Secure cookie off plain http; browsers
        assert c.get("/console/fleet", headers=session).status_code == 200  # allow it on loopback
        assert c.post("/console/keys", data={"portal": "acme", "name": "x"}, headers=session).status_code == 403
        assert c.post("/console/keys", data={"portal": "acme", "name": "x", "csrf": "wrong"},
                      headers=session).status_code == 403
    # The console exists only on the admin socket.
    assert httpx.get(cortex.portal_urls["acme"][0] + "/console/login", timeout=10).status_code == 404


def test_a_portal_playground_streams_smollm2_and_stop_ends_the_generation_on_the_neuron(
        browser, cortex: Cortex, artifacts: Path) -> None:  # noqa: ANN001
    made = cortex.admin("POST", "/admin/keys", json={"portal": "acme", "name": "playground"})
    key = made.json()["key"]
    acme = cortex.portal_urls["acme"][0]
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.set_default_timeout(30_000)
    page.goto(acme + "/portal/playground")
    expect(page).to_have_url(re.compile(r"/portal/$"))  # no key yet: sign in first
    page.get_by_label("API key").fill("sk-hlx-0000000000000000_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/portal/playground$"))
    expect(page.locator("#model option[value=chat]")).to_have_count(1)
    page.get_by_label("Model").select_option("chat")
    page.get_by_label("Max tokens").fill("1500")
    page.get_by_label("Message").fill("Write a very long story about a dragon who learns to bake bread.")
    page.get_by_role("button", name="Send").click()

    answer = page.get_by_label("Answer")
    expect(answer).to_have_text(re.compile(r"\w+\W+\w+\W+\w+\W+\w+"), timeout=60_000)  # words stream in
    first = answer.inner_text()
    expect(answer).not_to_have_text(first)  # and keep coming
    running = cortex.wait_for(lambda f: next(n for n in f["neurons"] if n["node_id"] == "n1")["metrics"]["in_flight"],
                              "the generation in flight on n1")
    assert running >= 1
    page.screenshot(path=artifacts / "portal-playground.png", full_page=True)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#chat-status")).to_have_text("Stopped.")
    stopped_at = len(answer.inner_text())
    cortex.wait_for(lambda f: next(n for n in f["neurons"] if n["node_id"] == "n1")["metrics"]["in_flight"] == 0,
                    "in-flight back to 0 on n1", timeout=10)
    time.sleep(0.5)
    assert len(answer.inner_text()) == stopped_at  # nothing more arrived
    rec = cortex.admin("GET", "/admin/usage/records?portal=acme").json()["data"]
    mine = [r for r in rec if r["key_id"] == made.json()["key_id"]]
    assert mine and mine[-1]["outcome"] == "client_gone" and mine[-1]["completion_tokens"] < 1500

    page.goto(acme + "/portal/usage")
    expect(page.locator("#usage")).to_contain_text("Remaining budget")
    expect(page.locator("#usage")).to_contain_text("chat")
    page.screenshot(path=artifacts / "portal-usage.png", full_page=True)
    page.goto(acme + "/portal/snippets")
    expect(page.locator("#snippet-openai")).to_contain_text(acme + "/v1")
    expect(page.locator("#snippet-curl .model-name")).not_to_have_text("MODEL")
    assert key not in page.content()
    page.screenshot(path=artifacts / "portal-snippets.png", full_page=True)
    page.close()


def test_a_second_portal_renders_its_own_theme(browser, cortex: Cortex, artifacts: Path) -> None:  # noqa: ANN001
    looks = {}
    for portal, name, rgb in (("acme", "Acme AI", "rgb(176, 0, 96)"), ("beta", "Beta Labs", "rgb(11, 110, 79)")):
        page = browser.new_page(viewport={"width": 390, "height": 700})
        page.goto(cortex.portal_urls[portal][0] + "/portal/")
        expect(page).to_have_title(re.compile(name))
        expect(page.locator("#portal-name")).to_have_text(name)
        expect(page.locator("header.topbar")).to_have_css("background-color", rgb)
        looks[portal] = page.locator("header.topbar").evaluate("e => getComputedStyle(e).backgroundColor")
        page.screenshot(path=artifacts / f"portal-{portal}-signin.png")
        page.close()
    assert looks["acme"] != looks["beta"]


def test_another_sites_page_cannot_use_the_gateway_and_a_rebinding_name_is_refused(
        browser, cortex: Cortex, tmp_path: Path) -> None:  # noqa: ANN001
    """A page on another origin (the operator browsing an attacker's site) sends the CORS
    "simple request" a browser sends without a preflight; the gateway refuses it before any
    work. A name resolving to 127.0.0.1 (DNS rebinding) is refused too. The gateway's own
    page's requests go through."""
    import http.server
    import threading
    from functools import partial

    (tmp_path / "index.html").write_text("<!doctype html><title>elsewhere</title>")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                           partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    gateway = cortex.gateway_url
    port = gateway.rsplit(":", 1)[1]
    body = '{"model": "synth", "messages": [{"role": "user", "content": "hi"}]}'
    send = """([url, body, mode]) => fetch(url, {method: "POST", mode, headers: {"content-type": "text/plain"}, body})
                                         .then(r => r.status, () => "failed")"""
    # A browser of its own: the rebinding name resolves to 127.0.0.1 in it.
    b = browser.browser_type.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--host-resolver-rules=MAP rebound.test 127.0.0.1"])
    try:
        page = b.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
        # no-cors: the request is sent, its answer opaque to the page (status 0), not to the test.
        with page.expect_response(lambda r: r.url.endswith("/v1/messages/count_tokens")) as sent:
            assert page.evaluate(send, [gateway + "/v1/messages/count_tokens", body, "no-cors"]) == 0
        assert sent.value.status == 403  # refused before any work
        refused = page.goto(f"http://rebound.test:{port}/v1/models")
        assert refused is not None and refused.status == 403
        assert "host_not_allowed" in refused.text()
        # The gateway's own page: its POST carries its own Origin, and goes through.
        page.goto(gateway + "/portal/")
        assert page.evaluate(send, [gateway + "/v1/messages/count_tokens", body, "cors"]) == 200
    finally:
        b.close()
        site.shutdown()
