"""A portal removed from the config keeps its keys and its ledger rows, and the operator
still bills it (``helexa usage --portal``, ``GET /admin/usage?portal=`` answer for it): the
console's Usage page does too. It refused the filter with a 400 ``no portal`` and left the
portal out of its list, so neither the page nor its CSV export could show that portal's
usage alone. Over real sockets, a cortex started without the portal its key and rows name."""

from __future__ import annotations

import time

import httpx
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.portal.usage import UsageRecord
from neuron_double import NeuronDouble
from portals import acme, new_key, portals
from serving import ADMIN_TOKEN, admin_headers
from test_console_client_names import console_page


async def test_the_usage_page_filters_by_a_removed_portal_whose_keys_and_rows_remain() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key_id = new_key(store, "beta")[7:23]  # beta: in the config before, not now
    now = time.time()
    store.append([UsageRecord(request_id="r1", portal="beta", key_id=key_id, endpoint="chat", model_asked="fast",
                              model_served="chat", started_at=now - 2, ended_at=now - 1, prompt_tokens=3,
                              completion_tokens=4, cost=0.25, currency="EUR")])
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        with trio.fail_after(60):
            await gateway.web._built.wait()
            async with httpx.AsyncClient(timeout=30) as http:
                api = await http.get(urls["default"] + "/admin/usage?by=key&portal=beta", headers=admin_headers())
                assert api.status_code == 200 and api.json()["data"][0]["key"] == key_id
                page = await console_page(http, urls["default"], "/console/usage?by=key&portal=beta")
                login = await http.post(urls["default"] + "/console/login", data={"token": ADMIN_TOKEN})
                cookie = login.headers["set-cookie"].split(";")[0]
                csv = await http.get(urls["default"] + "/console/usage.csv?by=key&portal=beta",
                                     headers={"cookie": cookie})
                typo = await http.get(urls["default"] + "/console/usage?by=key&portal=btea",
                                      headers={"cookie": cookie})
    assert key_id in page and "<option selected>beta</option>" in page
    assert csv.status_code == 200 and key_id in csv.text and "0.25" in csv.text
    assert typo.status_code == 400  # a portal neither configured nor billed is still a typo
