"""The console's Portals & keys page shows all a key spent, in each currency it spent in.

A reload that changes a portal's ``currency`` leaves its keys' ledger rows in two currencies
(docs/portals.md: amounts of two currencies are never added). The page kept one report row
per key, the last one read: a key that spent 0.014 EUR then 0.007 USD showed
"0.007000 USD, 7 tokens, 1 requests", as if the euros had never been spent. Over real
sockets: requests, a currency change, more requests, the page."""

from __future__ import annotations

import re

import httpx
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals
from test_console_client_names import console_page

CHAT = {"model": "fast", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}


async def test_a_key_that_spent_in_two_currencies_shows_both_amounts_and_all_its_requests() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    key_id = key[7:23]
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        with trio.fail_after(60):
            await gateway.web._built.wait()
            async with httpx.AsyncClient(timeout=30) as http:
                for _ in range(2):
                    r = await http.post(urls["acme"] + "/v1/chat/completions", json=CHAT, headers=bearer(key))
                    assert r.status_code == 200, r.text
                portal = gateway.portals["acme"]
                portal.reconfigure(portal.config.model_copy(update={"currency": "USD"}))  # as a reload does
                gateway.metering.portal_changed(portal)
                r = await http.post(urls["acme"] + "/v1/chat/completions", json=CHAT, headers=bearer(key))
                assert r.status_code == 200, r.text
                page = await console_page(http, urls["default"], "/console/keys")
    rows = {r["currency"]: r for r in store.report(by="key")}
    assert set(rows) == {"EUR", "USD"}
    row = re.search(rf'<tr data-key="{key_id}">(.*?)</tr>', page, re.S)
    assert row is not None, page[:2000]
    text = re.sub(r"<[^>]+>", " ", row.group(1))
    assert f"{rows['EUR']['cost']:.6f} EUR" in text and f"{rows['USD']['cost']:.6f} USD" in text, text
    assert f"{rows['EUR']['requests'] + rows['USD']['requests']} requests" in text, text
    assert f"{rows['EUR']['total_tokens'] + rows['USD']['total_tokens']} tokens" in text, text
