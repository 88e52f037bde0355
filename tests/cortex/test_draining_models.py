"""A model being unloaded (drained first) still holds its memory and its place until it is
gone: no load is planned into that memory, and none of the model itself is sent to the
neuron draining it. Through the orchestrator's shell over neuron doubles on trio's
virtual clock."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from helexa.protocol import GenerateRequest, GenerateResult, LoadModel, SamplingParams, Task
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator
from neuron_double import NeuronDouble, hardware
from serving import cortex_config

# Room for one of them at a time on a 2 GB neuron.
MODELS = Catalogue([CatalogueEntry(id=m, backend="synthetic", memory_mb=1500) for m in ("A", "C")])


@asynccontextmanager
async def orchestrating(fleet: Fleet, **orchestrator):
    orchestrator.setdefault("memory_headroom", 1.0)
    orch = Orchestrator(cortex_config(orchestrator=orchestrator), fleet, MODELS)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        yield orch
        nursery.cancel_scope.cancel()


async def run(orch: Orchestrator, rid: str, model: str, log: dict, tokens: int | None = None) -> None:
    request = GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": rid},),
                              sampling=SamplingParams(max_tokens=tokens))
    async with orch.generate(request) as gen:
        log.setdefault("started", {})[rid] = trio.current_time()
        async for event in gen:
            if isinstance(event, GenerateResult):
                log.setdefault("results", {})[rid] = (event.usage.completion_tokens, trio.current_time())


def load_times(neuron: NeuronDouble, log: list[tuple[str, float]]) -> None:
    """Record when each LoadModel reaches ``neuron`` (and what it held then)."""
    provision = neuron.provision

    async def recording(command, **kw):  # noqa: ANN001, ANN003
        if isinstance(command, LoadModel):
            held = sorted(m for m, st in neuron.models.items() if st.state.value in ("loaded", "loading"))
            log.append((command.model_id, trio.current_time(), held))
        return await provision(command, **kw)

    neuron.provision = recording  # type: ignore[method-assign]


async def test_a_load_waits_for_the_memory_a_draining_model_still_holds(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=10, token_delay=1.0)
    loads: list = []
    load_times(neuron, loads)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, drain_grace=100.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "long", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(orch.unload, "n1", "A")  # the operator's: drains "long" first
            await trio.sleep(1.0)
            assert ("n1", "A") in orch.provisioner.draining
            clients.start_soon(run, orch, "c", "C", log, 1)
    assert log["results"]["long"] == (10, 10.0)
    assert neuron.unloaded_at == [("A", 10.0)]
    # C's load went out once A had left, into the memory A gave back: never both at once.
    assert loads == [("C", 10.0, [])]
    assert log["started"]["c"] == 11.0


async def test_a_request_for_a_draining_model_loads_it_again_only_once_it_left(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=10, token_delay=1.0,
                          load_delay=2.0)
    loads: list = []
    load_times(neuron, loads)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, drain_grace=100.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "long", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(orch.unload, "n1", "A")
            for i in range(4):  # requests keep arriving while A drains
                await trio.sleep(1.0)
                clients.start_soon(run, orch, f"late{i}", "A", log, 1)
        load_seconds = orch.provisioner.load_times["A"]
        metrics = orch.metrics.render().decode()
    assert neuron.unloaded_at == [("A", 10.0)]
    # No LoadModel for A reached the neuron draining it (an "already loaded" no-op there was
    # counted as a cold load of 0 s, and made A look free to lose); one real load after.
    assert loads == [("A", 10.0, [])]
    assert load_seconds == 2.0
    assert [log["started"][f"late{i}"] for i in range(4)] == [13.0] * 4  # its first token, 1 s after the load
    assert 'helexa_cold_loads_total{model="A",neuron="n1"} 1.0' in metrics


async def test_a_preload_during_the_drain_answers_once_the_model_is_loaded_again(autojump_clock) -> None:
    """Ollama's preload (an empty prompt) answered "loaded" at once for a model being
    unloaded, which then left: its client went on as if it were loaded."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=10, token_delay=1.0,
                          load_delay=2.0)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, drain_grace=100.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "long", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(orch.unload, "n1", "A")
            await trio.sleep(1.0)
            await orch.preload(GenerateRequest("p", "A", Task.CHAT, messages=()))
            preloaded = trio.current_time()
            assert neuron.models["A"].state.value == "loaded"
    assert neuron.unloaded_at == [("A", 10.0)]
    assert preloaded == 12.0  # the drain (until 10), then the load (2 s)


async def test_a_second_unload_answers_when_the_model_is_off_not_while_it_drains(autojump_clock) -> None:
    """``helexa models unload`` of a model another unload was draining said "unloaded from
    n1" at once, the model still loaded and serving there (docs: it answers once the model
    is off its neurons)."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=10, token_delay=1.0)
    log: dict = {}
    answered: list[float] = []
    async with orchestrating(fleet, min_residency=0.0, drain_grace=100.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "long", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(orch.unload, "n1", "A")
            await trio.sleep(1.0)
            await orch.unload("n1", "A")
            answered.append(trio.current_time())
    assert neuron.unloaded_at == [("A", 10.0)] and neuron.unloads() == ["A"]  # one unload
    assert answered == [10.0]
