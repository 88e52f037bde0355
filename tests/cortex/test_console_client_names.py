"""Names a client makes up (a model's, an unknown field's) are never kept whole by the cortex.

Model names never reach the console whole: each request below asks,
over real sockets, for a model nothing serves (a key pasted into ``model``, a megabyte of
text, many distinct names), on the open portal and a keyed one; the console's Models page
(its routing decisions) and Traffic page then hold no secret, stay small, and still count
the real model asked afterwards (the Traffic page keeps a bounded number of series: made-up
names used to fill it, and the real traffic went uncounted)."""

from __future__ import annotations

import httpx
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals
from serving import ADMIN_TOKEN


def chat(model: str) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}


async def console_page(http: httpx.AsyncClient, base: str, path: str) -> str:
    login = await http.post(base + "/console/login", data={"token": ADMIN_TOKEN})
    assert login.status_code == 303
    cookie = login.headers["set-cookie"].split(";")[0]  # Secure: httpx keeps it for https only
    page = await http.get(base + path, headers={"cookie": cookie})
    assert page.status_code == 200, page.text[:300]
    return page.text


async def test_made_up_model_names_leave_the_console_small_secret_free_and_counting() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        gateway.web.traffic.max_series = 8
        with trio.fail_after(60):
            await gateway.web._built.wait()
        names = [key, ADMIN_TOKEN, "m" * 1_000_000, *(f"made-up-{i}" for i in range(12))]
        async with httpx.AsyncClient(timeout=60) as http:
            for name in names:
                for base, headers in ((urls["default"], {}), (urls["acme"], bearer(key))):
                    r = await http.post(base + "/v1/chat/completions", json=chat(name), headers=headers)
                    assert r.status_code == 404, r.text[:200]
            assert (await http.post(urls["default"] + "/v1/chat/completions", json=chat("chat"))).status_code == 200
            models = await console_page(http, urls["default"], "/console/models")
            traffic = await console_page(http, urls["default"], "/console/traffic")
    for page in (models, traffic):
        assert len(page) < 300_000
        assert key not in page and key[-43:] not in page and ADMIN_TOKEN not in page
        assert "m" * 100 not in page
    assert "made-up-11" in models  # the operator still sees what was asked for, cut and masked
    assert "sk-hlx-***" in models
    assert "made-up-" not in traffic  # counted together, as in /metrics
    assert "&#34;model&#34;: &#34;chat&#34;" in traffic  # the real model's request was counted


async def test_unknown_field_names_a_client_makes_up_are_never_kept_whole(monkeypatch, caplog) -> None:
    """The gateway logs each unknown request field once, and remembers which it logged: a
    megabyte of made-up name per request (up to 200 names) was kept whole, for good."""
    from helexa.roles.cortex import openai_api

    monkeypatch.setattr(openai_api, "_logged_unknown", set())
    caplog.set_level("INFO", logger="helexa.roles.cortex.openai_api")
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], timeout=60) as http:
            for i in range(5):
                body = {**chat("chat"), f"{i}" + "x" * 1_000_000: 1}
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    assert len(openai_api._logged_unknown) == 5
    assert sum(map(len, openai_api._logged_unknown)) <= 5 * 64
    assert all(len(r.getMessage()) < 200 for r in caplog.records)


async def test_the_cortex_keeps_nothing_of_a_made_up_model_name() -> None:
    """Every request used to leave its made-up model name (3 copies, for good) in the
    orchestrator's demand and slot tables and the edge's tokenizer cache: a client sending a
    new megabyte name per request grew the cortex without bound (+8.6 MB a request)."""
    import gc
    import tracemalloc

    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with portals(fleet, {}) as (gateway, urls):
        with trio.fail_after(60):
            await gateway.web._built.wait()  # the pages' imports are not this test's
        async with httpx.AsyncClient(base_url=urls["default"], timeout=60) as http:
            assert (await http.post("/v1/chat/completions", json=chat("warm-up"))).status_code == 404
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(20):
                    status = (await http.post("/v1/chat/completions", json=chat(f"{i}" + "m" * 1_000_000))).status_code
                    assert status == 404
                gc.collect()
                kept = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
    assert kept < 5_000_000, kept  # twenty names of a megabyte each: none of them kept
