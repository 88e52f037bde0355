"""The models a joined neuron names are held to the limits node ids have: a model id is at
most 256 printable characters, and a report (a join, a heartbeat) names at most 1,024
models. Before, only the 16 MiB frame bounded them: one neuron pushed megabytes of names
into the fleet document consoles get every second, ``/metrics`` labels and the cortex's
memory. What breaks a limit is dropped with one WARNING (the neuron keeps working, whatever
its release: nothing new is sent to it); the rest of the report stands.

A real control server on 127.0.0.1:0 and the project's own join session and websocket
client (:func:`test_hostile_neuron.hostile`)."""

from __future__ import annotations

import logging

import httpx
import trio

from helexa.protocol import Heartbeat, ModelConfig, ModelState, ModelStatus, ModelStatusChanged, NeuronDescriptor
from helexa.protocol import Hardware, NeuronMetrics
from helexa.protocol.join import NeuronJoin
from helexa.protocol.model import MAX_MODEL_ID, MAX_NEURON_MODELS
from helexa.roles.cortex.fleet import Fleet
from helexa.transport import websocket as ws
from helexa.transport.handshake import exchange
from portals import portals
from serving import admin_headers
from hostile_neuron import TOKEN, control, hostile, until

LONG = "m" * 100_000
FORGED = "chat\n12:00:00 WARNING cortex: all neurons healthy"


async def test_overlong_and_unprintable_model_ids_are_dropped_from_a_neurons_reports(nursery, caplog):
    fleet = Fleet()
    url = await control(nursery, fleet)
    fitting = "f" * MAX_MODEL_ID
    with caplog.at_level(logging.WARNING, logger="helexa.roles.cortex.neuron_link"):
        nursery.start_soon(lambda: hostile(url, models=("chat", LONG, FORGED, fitting, "\u202eevil")))
        await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 2)
        assert set(fleet.get("evil").models) == {"chat", fitting}
        async with portals(fleet, {}) as (_, urls):
            async with httpx.AsyncClient() as http:
                view = await http.get(urls["default"] + "/admin/fleet", headers=admin_headers())
                metrics = await http.get(urls["default"] + "/metrics", headers=admin_headers())
                listed = await http.get(urls["default"] + "/v1/models")
        assert LONG not in view.text and LONG not in metrics.text and "12:00:00" not in view.text
        assert len(view.content) < 20_000 and {m["id"] for m in listed.json()["data"]} >= {"chat", fitting}
    dropped = [r for r in caplog.records if "neuron evil: " in r.getMessage() and "dropped" in r.getMessage()]
    assert len(dropped) == 1, [r.getMessage() for r in dropped]  # once, not once a heartbeat
    message = dropped[0].getMessage()
    assert "100000 characters long" in message and "dropped" in message and "2 more" in message
    assert "\n" not in message and len(message) < 1000


async def test_a_neuron_naming_more_models_than_the_limit_keeps_the_first_ones(nursery, caplog):
    fleet = Fleet()
    url = await control(nursery, fleet)
    names = tuple(f"model-{i}" for i in range(MAX_NEURON_MODELS + 500))
    statuses = tuple(ModelStatus(m, ModelState.LOADED) for m in names)
    configs = tuple(ModelConfig(m, "synthetic") for m in names)

    async def flood() -> None:
        descriptor = NeuronDescriptor("evil", Hardware(cpu_cores=4, ram_total=8 << 30))
        async with ws.connect(url) as channel:
            session = NeuronJoin(TOKEN, descriptor, timeout=10, models=statuses, configs=configs)
            await exchange(channel, session, session.start())
            await channel.send(Heartbeat(1, NeuronMetrics(), statuses))
            await channel.send(ModelStatusChanged(ModelStatus("one-more", ModelState.LOADED)))
            await channel.send(ModelStatusChanged(ModelStatus(LONG, ModelState.LOADED)))
            await channel.send(Heartbeat(2, NeuronMetrics(), statuses))
            await trio.sleep_forever()

    with caplog.at_level(logging.WARNING, logger="helexa.roles.cortex.neuron_link"):
        nursery.start_soon(flood)
        await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats == 2)
    link = fleet.get("evil")
    assert list(link.models) == list(names[:MAX_NEURON_MODELS])
    assert list(link.configs) == list(names[:MAX_NEURON_MODELS])
    assert len(link.loaded_since) == MAX_NEURON_MODELS
    warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warned) == 1 and f"at most {MAX_NEURON_MODELS}" in warned[0], warned


async def test_an_honest_neuron_with_a_model_id_of_the_longest_length_serves_it(nursery):
    from helexa.protocol import GenerateResult, Usage

    longest = "org/" + "x" * (MAX_MODEL_ID - 4)

    async def answer(channel, request) -> None:  # noqa: ANN001
        await channel.send(GenerateResult(request.request_id, "stop", Usage(3, 1, 0), text="ok"))

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(lambda: hostile(url, answer, node_id="honest", models=(longest,)))
    await until(lambda: "honest" in fleet and longest in fleet.get("honest").models)
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(urls["default"] + "/v1/chat/completions",
                                json={"model": longest, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


async def test_a_neurons_status_error_text_and_backend_kind_are_bounded(nursery, caplog):
    """A model status's ``error`` and ``backend_kind`` were bounded by the 16 MiB frame
    alone: a neuron put 100,000 characters (or a forged log line) into the fleet document
    every console gets each second and ``helexa status`` prints. The error text is cut at
    1,024 printable characters with a mark (an unprintable one written as its escape); a
    backend kind that is no backend's name is dropped (empty); the model stays, and an
    honest status is kept as it is."""
    fleet = Fleet()
    url = await control(nursery, fleet)
    statuses = (ModelStatus("chat", ModelState.FAILED, backend_kind="k" * 5000, error=LONG),
                ModelStatus("embed", ModelState.FAILED, backend_kind="llama_cpp\x1b[2J", error=FORGED),
                ModelStatus("fine", ModelState.FAILED, backend_kind="llama_cpp", error="bad magic in x.gguf"))
    with caplog.at_level(logging.WARNING, logger="helexa.roles.cortex.neuron_link"):
        nursery.start_soon(lambda: hostile(url, statuses=statuses))
        await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 2)
        models = fleet.get("evil").models
        async with portals(fleet, {}) as (_, urls):
            async with httpx.AsyncClient() as http:
                view = await http.get(urls["default"] + "/admin/fleet", headers=admin_headers())
    chat, embed, fine = models["chat"], models["embed"], models["fine"]
    assert chat.error == "m" * 1024 + "... [cut from 100000 characters]"
    assert len(chat.error) < 1100 and chat.backend_kind == ""
    assert embed.error == FORGED.replace("\n", "\\n")
    assert embed.backend_kind == ""
    assert fine == statuses[2]
    assert LONG not in view.text and "k" * 5000 not in view.text and "\n12:00:00" not in view.text
    assert len(view.content) < 20_000
    warned = [r.getMessage() for r in caplog.records if "neuron evil: " in r.getMessage()]
    assert len(warned) == 1 and len(warned[0]) < 1000 and "\n" not in warned[0]


async def test_a_joining_neurons_descriptor_text_is_bounded(nursery):
    """The free text a neuron describes itself with (host name, build, CPU and GPU names,
    labels) was bounded by the join's frame alone, and the console and ``helexa status``
    show it: each is held to 256 printable characters with a mark, at most 64 GPUs and
    labels; an honest descriptor's text is kept as it is."""
    from helexa.protocol import GpuInfo

    fleet = Fleet()
    url = await control(nursery, fleet)
    gpus = tuple(GpuInfo(i, "G" * 10_000 if i == 0 else "gpu\x1b[2J", 1 << 30, 1 << 30) for i in range(100))
    hw = Hardware(cpu_cores=4, ram_total=8 << 30, cpu_model="c" * 10_000, gpus=gpus)
    nursery.start_soon(lambda: hostile(url, hardware=hw))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    d = fleet.get("evil").descriptor
    assert d.hardware.cpu_model == "c" * 256 + "... [cut from 10000 characters]"
    assert len(d.hardware.gpus) == 64 and d.hardware.gpus[0].name == "G" * 256 + "... [cut from 10000 characters]"
    assert d.hardware.gpus[1].name == "gpu\\x1b[2J"
    assert d.hardware.cpu_cores == 4 and d.hardware.gpus[1].vram_total == 1 << 30
