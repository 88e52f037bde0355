"""The admin API's model routes over neuron doubles: the catalogue against the fleet,
operator loads streamed as NDJSON, unloads, pins that keep a model resident. Progress
from a real neuron's download is in ``tests/e2e/test_models_cli_e2e.py``."""

from __future__ import annotations

import json

import httpx
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble, hardware
from serving import admin_headers, serving

CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=500),
    CatalogueEntry(id="big", backend="synthetic", memory_mb=500, min_devices=1, min_device_vram_mb=1000),
    CatalogueEntry(id="chat2", backend="synthetic", memory_mb=500, idle_ttl=10),
])


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_list_shows_where_each_model_can_run_and_is_loaded() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "stray"))
    NeuronDouble("n2", fleet, hw=hardware(gpus=(8,)))
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/admin/models", headers=admin_headers())
        assert r.status_code == 200
        models = {m["id"]: m for m in r.json()["data"]}
        assert list(models) == ["chat", "big", "chat2", "stray"]
        assert models["chat"]["feasible_on"] == ["n1", "n2"]
        assert models["chat"]["neurons"]["n1"]["state"] == "loaded"
        assert models["big"]["feasible_on"] == ["n2"] and models["big"]["neurons"] == {}
        assert models["stray"]["catalogued"] is False
        one = await http.get("/admin/models/big", headers=admin_headers())
        assert one.json()["feasible_on"] == ["n2"]
        assert (await http.get("/admin/models/nope", headers=admin_headers())).status_code == 404
        assert (await http.get("/admin/models")).status_code == 401  # the admin token, always


async def test_load_on_a_chosen_neuron_streams_its_outcome_and_unload_takes_it_off() -> None:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    n2 = NeuronDouble("n2", fleet)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/admin/models/chat/load", json={"neuron": "n2"}, headers=admin_headers())
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        assert _events(r.text) == [{"event": "done", "neuron": "n2"}, {"event": "end", "ok": True}]
        assert n2.loads() == ["chat"] and n1.loads() == []
        r = await http.post("/admin/models/big/load", json={}, headers=admin_headers())
        events = _events(r.text)
        assert events[0]["event"] == "error" and "hardware" in events[0]["message"]
        assert events[-1] == {"event": "end", "ok": False}
        r = await http.post("/admin/models/chat/unload", json={}, headers=admin_headers())
        assert r.json() == {"model": "chat", "unloaded_from": ["n2"]}
        assert n2.unloads() == ["chat"]
        for path, body, status in [("/admin/models/chat/load", {"neuron": "n9"}, 404),
                                   ("/admin/models/nope/load", {}, 404),
                                   ("/admin/models/chat/pin", {}, 400),
                                   ("/admin/models/chat/load", {"node": "n1"}, 400),
                                   # a model id may hold "/": this is model chat/explode's path, GET only
                                   ("/admin/models/chat/explode", {}, 405)]:
            r = await http.post(path, json=body, headers=admin_headers())
            assert r.status_code == status, (path, r.text)
            assert "error" in r.json()


async def test_a_pinned_model_is_loaded_there_kept_past_its_idle_ttl_and_reloaded_when_lost(autojump_clock) -> None:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    NeuronDouble("n2", fleet)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/admin/models/chat2/pin", json={"neuron": "n1"}, headers=admin_headers())
        assert r.json() == {"model": "chat2", "neuron": "n1", "pinned": True, "changed": True}
        await trio.sleep(1)
        assert n1.loads() == ["chat2"]
        await trio.sleep(60)  # six idle TTLs
        assert n1.unloads() == []
        assert (await http.get("/admin/models/chat2", headers=admin_headers())).json()["pinned_on"] == ["n1"]
        n1.models.pop("chat2")  # lost (a crash of its worker, say)
        fleet.notify()
        await trio.sleep(1)
        assert n1.loads() == ["chat2", "chat2"]
        r = await http.post("/admin/models/chat2/unpin", json={"neuron": "n1"}, headers=admin_headers())
        assert r.json()["changed"] is True
        await trio.sleep(11)
        assert n1.unloads() == ["chat2"]  # an ordinary model again: idle past its TTL


async def test_a_sources_credentials_and_signature_are_not_shown() -> None:
    signed = "https://operator:s3cret@files.example/m/model.gguf?X-Amz-Signature=SIG0123&token=TOK0456"
    catalogue = Catalogue([CatalogueEntry(id="signed", backend="synthetic", memory_mb=500, source=signed,
                                          sha256="0" * 64)])
    fleet = Fleet()
    NeuronDouble("n1", fleet)
    async with serving(fleet, catalogue) as (_, url), httpx.AsyncClient(base_url=url) as http:
        listed = (await http.get("/admin/models", headers=admin_headers())).text
        one = (await http.get("/admin/models/signed", headers=admin_headers())).json()
    assert one["source"] == "https://***@files.example/m/model.gguf?***"
    for leak in ("s3cret", "SIG0123", "TOK0456"):
        assert leak not in listed and leak not in str(one)
