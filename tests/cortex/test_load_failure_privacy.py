"""A failed cold load as each API's client sees it: which model could not be loaded and the
request id, never the neuron's id or the neuron's own words (a model file's path). The
cortex's log and the admin API keep the detail."""

from __future__ import annotations

import logging

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import CATALOGUE, acme, new_key, portals
from serving import admin_headers, serving

NODE = "gpu-box-7f3a"
SECRET = "/srv/helexa/models/chat-q4.gguf: invalid magic"

SURFACES = [
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "chat", "prompt": "hi"}),
    ("/v1/messages", {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"model": "chat", "input": "hi"}),
    ("/api/chat", {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/generate", {"model": "chat", "prompt": "hi"}),
]


def refusing(fleet: Fleet, load_delay: float = 0.0) -> NeuronDouble:
    neuron = NeuronDouble(NODE, fleet, load_delay=load_delay)
    neuron.refuse_load = True
    neuron.load_error = SECRET
    return neuron


@pytest.mark.parametrize("stream", [False, True, "late"], ids=["whole", "streamed", "streamed-after-keepalives"])
@pytest.mark.parametrize(("path", "body"), SURFACES)
async def test_a_client_learns_the_model_could_not_be_loaded_and_nothing_of_the_operator(
        path, body, stream, caplog) -> None:
    """``late``: the load fails after the stream began (its keep-alives went out), so the
    error is the stream's last event rather than the response."""
    fleet = Fleet()
    refusing(fleet, load_delay=0.5 if stream == "late" else 0.0)
    caplog.set_level(logging.WARNING)
    async with serving(fleet, CATALOGUE, orchestrator={"keepalive_interval": 0.1}) as (_, url):
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(url + path, json={**body, "stream": bool(stream)})
    request_id = r.headers["x-request-id"]
    if stream == "late":
        assert r.status_code == 200  # the error came inside the stream
    assert NODE not in r.text and "/srv/" not in r.text and "invalid magic" not in r.text
    assert "could not be loaded" in r.text and request_id in r.text
    logged = caplog.text
    assert SECRET in logged and request_id in logged and NODE in logged


async def test_the_official_clients_see_a_clean_error() -> None:
    fleet = Fleet()
    refusing(fleet)
    async with serving(fleet, CATALOGUE) as (_, url):
        def run() -> list[str]:
            out = []
            with pytest.raises(openai.APIStatusError) as caught:
                openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}])
            out.append(str(caught.value))
            with pytest.raises(anthropic.APIStatusError) as caught2:
                anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
                    model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            out.append(str(caught2.value))
            with pytest.raises(ollama.ResponseError) as caught3:
                ollama.Client(host=url).chat(model="chat", messages=[{"role": "user", "content": "hi"}],
                                             stream=False)
            out.append(caught3.value.error)
            return out

        for text in await trio.to_thread.run_sync(run):
            assert "could not be loaded" in text and NODE not in text and "/srv/" not in text


async def test_the_operator_sees_the_detail_in_the_admin_api() -> None:
    fleet = Fleet()
    refusing(fleet)
    async with serving(fleet, CATALOGUE) as (_, url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post("/admin/models/chat/load", json={"neuron": NODE}, headers=admin_headers())
    assert '"event": "error"' in r.text and NODE in r.text and SECRET in r.text  # the NDJSON stream's error line


async def test_a_portals_alias_is_what_a_failed_load_names_never_the_model_behind_it() -> None:
    """A key asks for ``fast``, the portal's alias of the catalogue's ``chat``: the failed
    load's message named ``'chat'``, which a portal never reveals."""
    fleet = Fleet()
    refusing(fleet)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        url = urls["acme"]

        def run() -> list[str]:
            out = []
            with pytest.raises(openai.APIStatusError) as caught:
                openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).chat.completions.create(
                    model="fast", messages=[{"role": "user", "content": "hi"}])
            out.append(caught.value.message)
            with pytest.raises(openai.APIStatusError) as caught:
                openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).responses.create(
                    model="fast", input="hi")
            out.append(caught.value.message)
            with pytest.raises(anthropic.APIStatusError) as caught2:
                anthropic.Anthropic(base_url=url, api_key=key, max_retries=0).messages.create(
                    model="fast", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            out.append(caught2.value.message)
            client = ollama.Client(host=url, headers={"authorization": f"Bearer {key}"})
            for call in (lambda: client.chat(model="fast", messages=[{"role": "user", "content": "hi"}]),
                         lambda: client.generate(model="fast", prompt="")):  # Ollama's preload
                with pytest.raises(ollama.ResponseError) as caught3:
                    call()
                out.append(caught3.value.error)
            return out

        texts = await trio.to_thread.run_sync(run)
    for text in texts:
        assert "model 'fast' could not be loaded" in text and "'chat'" not in text, text


async def test_no_capacity_names_the_portals_alias_too() -> None:
    """No neuron at all: "no usable neuron for model 'chat' right now" told a key that asked
    for ``fast`` what its portal serves it with."""
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(Fleet(), {"acme": acme()}, store=store,
                       orchestrator={"queue_timeout": 0.5, "cold_load_wait": 0.5}) as (_, urls):
        async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {key}"}) as http:
            chat = await http.post(urls["acme"] + "/v1/chat/completions", json={
                "model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            preload = await http.post(urls["acme"] + "/api/generate", json={"model": "fast", "prompt": ""})
    for r in (chat, preload):
        assert r.status_code == 503 and "'fast'" in r.text and "'chat'" not in r.text, r.text
