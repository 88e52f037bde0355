"""Ollama's preload: ``generate`` with an empty prompt, or ``chat`` with no messages, loads
the model (the cortex's cold load, admitted by the caller's limits as any request) and
answers ``done_reason: "load"`` once it is loaded; a failed load is Ollama's error. With
Ollama's official client over real sockets, neuron doubles behind the cortex."""

from __future__ import annotations

import httpx
import ollama
import pytest
import trio

from helexa.protocol import LoadModel, ModelState
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals


def client(url: str, key: str) -> ollama.Client:
    return ollama.Client(host=url, headers=bearer(key), timeout=20)


def loads(neuron: NeuronDouble) -> list[str]:
    return [c.model_id for c in neuron.commands if isinstance(c, LoadModel)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True], ids=["generate", "chat"])
async def test_an_empty_request_loads_the_model_and_answers_load_once_it_is_loaded(chat, stream) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, load_delay=0.5)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store,
                       orchestrator={"keepalive_interval": 0.2}) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            call = (lambda: c.chat(model="fast:latest", messages=[], stream=stream)) if chat else (
                lambda: c.generate(model="fast", prompt="", stream=stream))
            got = call()
            return list(got) if stream else [got]

        with trio.fail_after(15):
            got = await trio.to_thread.run_sync(run)
    final = got[-1]
    assert final.done and final.done_reason == "load" and all(not g.done for g in got[:-1])
    assert len(got) > 1 if stream else len(got) == 1  # a stream's empty pieces while it loads
    assert (final.message.content if chat else final.response) == ""
    assert loads(neuron) == ["chat"] and neuron.models["chat"].state is ModelState.LOADED
    assert neuron.requests == []  # nothing ran


async def test_a_loaded_model_answers_at_once_and_nothing_loads_again() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        got = await trio.to_thread.run_sync(lambda: client(urls["acme"], key).generate(model="fast", prompt=""))
    assert got.done_reason == "load" and loads(neuron) == [] and neuron.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_load_is_an_error_the_client_raises(stream) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)
    neuron.refuse_load = True
    neuron.load_error = "/models/x.gguf: bad magic"
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            got = client(urls["acme"], key).generate(model="fast", prompt="", stream=stream)
            return list(got) if stream else got

        with pytest.raises(ollama.ResponseError) as caught:
            await trio.to_thread.run_sync(run)
    assert "could not be loaded" in caught.value.error and "/models/" not in caught.value.error
    assert loads(neuron) == ["chat"]


async def test_a_preload_is_admitted_by_the_keys_limits_as_a_request() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", rpm=1)
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(timeout=10) as http:
            first = await http.post(urls["acme"] + "/api/generate", json={"model": "fast"}, headers=bearer(key))
            second = await http.post(urls["acme"] + "/api/generate", json={"model": "fast"}, headers=bearer(key))
            unknown = await http.post(urls["acme"] + "/api/chat", json={"model": "nope", "messages": []},
                                      headers=bearer(key))
    assert first.status_code == 200 and first.json()["done_reason"] == "load"
    assert second.status_code == 429 and "requests per minute" in second.json()["error"]
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}


@pytest.mark.parametrize("keep_alive", [0, "0", "0s", "0m", 0.5])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True], ids=["generate", "chat"])
async def test_keep_alive_zero_with_nothing_to_generate_answers_unload_and_neither_loads_nor_unloads(
        chat, stream, keep_alive) -> None:
    """Ollama's unload (``keep_alive`` 0, whole seconds of a number as Ollama truncates
    them, and an empty prompt): answered as Ollama answers it, and nothing done, so that a
    tenant of a shared fabric never unloads a model others use (nor loads one to answer)."""
    fleet = Fleet()
    loaded = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            got = c.chat(model="fast:latest", messages=[], stream=stream, keep_alive=keep_alive) if chat else (
                c.generate(model="fast", prompt="", stream=stream, keep_alive=keep_alive))
            return list(got) if stream else [got]

        with trio.fail_after(15):
            (got,) = await trio.to_thread.run_sync(run)
    assert got.done and got.done_reason == "unload" and got.model in ("fast", "fast:latest")
    assert (got.message.role, got.message.content) == ("assistant", "") if chat else got.response == ""
    assert [type(c).__name__ for c in loaded.commands if "Load" in type(c).__name__] == []  # nor Unload
    assert loaded.models["chat"].state is ModelState.LOADED and loaded.requests == []


async def test_unload_of_a_model_not_loaded_loads_nothing_and_a_negative_keep_alive_loads_it() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            unload = c.generate(model="fast", prompt="", keep_alive="0s")
            nothing = loads(neuron)
            forever = c.generate(model="fast", prompt="", keep_alive="-1m")  # Ollama: loaded forever
            return unload, nothing, forever

        with trio.fail_after(15):
            unload, nothing, forever = await trio.to_thread.run_sync(run)
    assert unload.done_reason == "unload" and nothing == []
    assert forever.done_reason == "load" and loads(neuron) == ["chat"]


async def test_an_unload_names_no_model_it_may_not_use_and_a_malformed_keep_alive_is_refused() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(timeout=10, headers=bearer(key)) as http:
            unknown = await http.post(urls["acme"] + "/api/generate", json={"model": "nope", "keep_alive": 0})
            malformed = await http.post(urls["acme"] + "/api/chat",
                                        json={"model": "fast", "messages": [], "keep_alive": "5"})
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
    assert malformed.status_code == 400 and "keep_alive" in malformed.json()["error"]


@pytest.mark.parametrize("budget", [0.0, 0.0005], ids=["nothing-left", "less-than-a-token"])
async def test_a_key_whose_budget_is_spent_loads_nothing(budget) -> None:
    """An empty prompt costs no tokens, but a key whose budget cannot pay for one (none
    left, or less than one token at the model's price: 0.001 EUR here) is refused as its
    requests are, in Ollama's shape, before any load: a spent key causes no work."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=budget)
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(timeout=10, headers=bearer(key)) as http:
            got = []
            for stream in (False, True):
                got.append(await http.post(urls["acme"] + "/api/generate", json={"model": "fast", "stream": stream}))
                got.append(await http.post(urls["acme"] + "/api/chat",
                                           json={"model": "fast", "messages": [], "stream": stream}))
    for r in got:
        assert r.status_code == 429 and set(r.json()) == {"error"} and "budget" in r.json()["error"]
    assert loads(neuron) == [] and neuron.requests == []
