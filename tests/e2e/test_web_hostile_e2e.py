"""The console under data from parties it does not control, in Debian's headless Chromium
(Playwright) against a real cortex (the mesh on) and real neurons:

* a neuron whose node id is near the longest a cortex admits (200 characters, one word), with a
  GPU and a model named by thousands of characters: the Fleet page stays as wide as the
  window (its card used to spill the page 70,000 pixels wide) and the Models page keeps
  every row's actions in view (they used to sit thousands of pixels to the right);
* a key named by 200 characters in one word (the admin API's longest; a billing system
  names keys after its customers): the Keys page keeps its Revoke and Rotate buttons in view;
* a model's answer of one word of 1,200 characters: the portal's playground wraps it, at
  phone width too (the page was 11,000 pixels wide), and the usage page fits a 360-pixel
  phone (its table scrolls in its frame);
* a peer's signed receipt whose times no date can show (it verifies: the peer signed what it
  liked): the Mesh page shows it and stays up (it was a 500 for as long as the receipt was
  in the ledger).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from browser import CHROMIUM, expect, sync_api
from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
memory_mb = 10
"""

CONFIG = """
admin_socket = "127.0.0.1:0"
[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"
"""

LONG_NODE = "N" * 200
"""A node id near the longest a cortex admits (256 characters; the test's log file is named
after it), in one word."""

# Imported at the start of each neuron's interpreter (PYTHONPATH): its synthetic model
# answers in one word of 40 characters a token, as a model may (a URL, base64, a hostile
# neuron's answer).
ONE_WORD_ANSWERS = """
from helexa.runtime import synthetic

_init = synthetic.SyntheticBackend.__init__


def _one_word(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self._spaced = ["x" * 40 for _ in range(self._tokens)]


synthetic.SyntheticBackend.__init__ = _one_word
"""

# And the second neuron's: its hardware has a GPU
# named by 3,000 characters and it reports a model of a 256-character id (the longest the cortex
# keeps; a longer one is dropped), as a hostile (or broken) neuron may.
LONG_NAMES_NEURON = """
import dataclasses
from helexa.protocol import ModelState, ModelStatus
from helexa.protocol.hardware import GpuInfo
from helexa.roles.neuron import hardware, registry

_discover = hardware.discover
hardware.discover = lambda: dataclasses.replace(_discover(), gpus=(GpuInfo(0, "G" * 3000, 8 << 30, 4 << 30),))
_statuses = registry.ModelRegistry.statuses
registry.ModelRegistry.statuses = lambda self: _statuses(self) + (ModelStatus("M" * 256, ModelState.LOADED),)
"""


def seed_hostile_receipt(data_dir: Path) -> None:
    """Put in ``data_dir``'s federation ledger a receipt another peer signed for this cortex
    (its identity made here, as the cortex makes it at first start), dated 1e300 seconds
    after 1970: it verifies, as its signer signed it."""
    from helexa import identity
    from helexa.mesh.peer_id import peer_id_from_ed25519
    from helexa.roles.cortex.federation.ledger import CONSUMED, Ledger
    from helexa.roles.cortex.federation.receipts import sign_receipt, verify_receipt

    data_dir.mkdir(parents=True, exist_ok=True)
    me = peer_id_from_ed25519(identity.load_or_create(data_dir / "identity.key").public_bytes)
    peer = identity.load_or_create(data_dir.parent / "peer.key")
    receipt = sign_receipt(peer, request_id="far-future", model_id="synth", prompt_tokens=3, completion_tokens=5,
                           price_input=0.0, price_output=0.0, started_at=1e300, ended_at=1e300, client_peer_id=me)
    assert verify_receipt(receipt, server_peer_id=receipt.server_peer_id, client_peer_id=me) == []
    with Ledger(data_dir / "ledger.sqlite") as ledger:
        assert ledger.record(CONSUMED, receipt)


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with ProcGroup(tmp_path_factory.mktemp("web-hostile")) as group:
        yield group


@pytest.fixture(scope="module")
def cortex(procs: ProcGroup) -> Cortex:
    data = procs.workdir / "cortex-data"
    seed_hostile_receipt(data)
    c = procs.cortex(models=MODELS, data_dir=data, config=CONFIG,
                     extra_args=["--operator", "probe", "--mesh-listen", "/ip4/127.0.0.1/tcp/0"])
    for node, patch in (("n1", ONE_WORD_ANSWERS), (LONG_NODE, ONE_WORD_ANSWERS + LONG_NAMES_NEURON)):
        site = procs.workdir / f"site-{node[:8]}"
        site.mkdir()
        (site / "sitecustomize.py").write_text(patch)
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        procs.neuron(c, node, env={"PYTHONPATH": path})
    return c


@pytest.fixture(scope="module")
def page(cortex: Cortex):  # noqa: ANN201
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(20_000)
        page.goto(cortex.admin_url + "/console/")
        page.get_by_label("Admin token").fill(cortex.admin_token)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(re.compile(r"/console/fleet$"))
        yield page
        browser.close()


def page_width(page) -> int:  # noqa: ANN001
    """How far the page reaches to the right, in CSS pixels."""
    return page.evaluate("document.documentElement.scrollWidth")


def test_long_names_from_a_neuron_keep_the_fleet_and_models_pages_as_wide_as_the_window(page) -> None:  # noqa: ANN001
    expect(page.locator("#fleet-age")).to_contain_text("2 neurons")
    # The 3,000-character GPU name, as the cortex keeps a descriptor's text: its first 256 and a mark.
    card = page.locator("article.neuron").filter(has_text="G" * 256 + "... [cut from 3000 characters]")
    expect(card).to_be_visible()
    expect(card).to_contain_text("M" * 256)  # the longest model id the cortex keeps (test_neuron_model_limits)
    assert page_width(page) <= 1280
    assert card.bounding_box()["width"] < 1280
    page.goto(page.url.replace("/console/fleet", "/console/models"))
    row = page.locator("#models tr[data-model=synth]")
    expect(row.locator("td").nth(2)).to_contain_text(LONG_NODE)  # feasible on it, its whole id shown
    box = row.get_by_role("button", name="Load", exact=True).bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1280, box  # in view, no scrolling to find it
    assert page_width(page) <= 1280


def test_the_console_pages_fit_a_phone_with_those_names_in_the_fleet(page) -> None:  # noqa: ANN001
    base = page.url.split("/console/")[0]
    page.set_viewport_size({"width": 390, "height": 800})
    try:
        for section in ("fleet", "models", "keys", "usage", "traffic", "mesh"):
            page.goto(f"{base}/console/{section}")
            expect(page.locator("main h1")).to_be_visible()
            # a table scrolls inside its frame; the page itself does not (the Models page's
            # hidden labels for its neuron pickers stuck out of the frame, 100 px past a phone)
            assert page_width(page) <= 390, section
    finally:
        page.set_viewport_size({"width": 1280, "height": 860})


def test_a_peers_receipt_dated_beyond_any_calendar_leaves_the_mesh_page_up(page) -> None:  # noqa: ANN001
    shown = page.goto(page.url.split("/console/")[0] + "/console/mesh")
    assert shown is not None and shown.status == 200
    row = page.locator("#receipts tbody tr").first
    expect(row).to_contain_text("synth")
    expect(row).to_contain_text("not a date")


def test_a_key_named_by_200_characters_keeps_its_actions_in_view(page) -> None:  # noqa: ANN001
    page.goto(page.url.split("/console/")[0] + "/console/keys")
    page.get_by_label("Name").fill("K" * 200)
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key")).to_have_value(re.compile(r"^sk-hlx-"))  # the key, shown once
    revoke = page.locator("#keys tbody tr").filter(has_text="K" * 200).get_by_role("button", name=re.compile("Revoke"))
    box = revoke.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1280, box
    assert page_width(page) <= 1280


def test_an_answer_in_one_long_word_wraps_in_the_playground_and_usage_fits_a_phone(
        cortex: Cortex, page) -> None:  # noqa: ANN001
    import httpx

    made = httpx.post(cortex.admin_url + "/admin/keys", json={"portal": "acme", "name": "phone"},
                      headers={"authorization": f"Bearer {cortex.admin_token}"}, timeout=10)
    assert made.status_code == 201, made.text
    phone = page.context.browser.new_page(viewport={"width": 360, "height": 760})  # a small phone
    phone.set_default_timeout(20_000)
    phone.goto(cortex.portal_urls["acme"][0] + "/portal/")
    phone.get_by_label("API key").fill(made.json()["key"])
    phone.get_by_role("button", name="Sign in").click()
    expect(phone).to_have_url(re.compile(r"/portal/playground$"))
    phone.get_by_label("Max tokens").fill("30")
    phone.get_by_label("Message").fill("hi")
    phone.get_by_role("button", name="Send").click()
    expect(phone.locator("#chat-status")).to_contain_text("Done")
    assert len(phone.locator("#answer").text_content()) > 1000  # one word
    assert page_width(phone) <= 360
    phone.goto(cortex.portal_urls["acme"][0] + "/portal/usage")  # its per-model table scrolls in its frame
    expect(phone.locator("#usage table")).to_contain_text("synth")
    assert page_width(phone) <= 360
    phone.close()
