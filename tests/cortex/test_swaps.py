"""Swaps planned from the whole queue, and drain before evict, through the orchestrator's
shell over neuron doubles on trio's virtual clock."""

from __future__ import annotations

from contextlib import asynccontextmanager
import random
import statistics
from functools import partial

import pytest
import trio

from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task, UnloadModel
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.errors import ColdLoadFailed
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator
from neuron_double import NeuronDouble, hardware
from serving import cortex_config

# Room for one of them at a time on a 2 GB neuron.
MODELS = Catalogue([CatalogueEntry(id=m, backend="synthetic", memory_mb=1500) for m in ("A", "B", "C")])


@asynccontextmanager
async def orchestrating(fleet: Fleet, **orchestrator):
    orchestrator.setdefault("memory_headroom", 1.0)
    orch = Orchestrator(cortex_config(orchestrator=orchestrator), fleet, MODELS)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        yield orch
        nursery.cancel_scope.cancel()


def chat(rid: str, model: str, tokens: int | None = None) -> GenerateRequest:
    return GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": rid},),
                           sampling=SamplingParams(max_tokens=tokens))


async def run(orch: Orchestrator, rid: str, model: str, log: dict, tokens: int | None = None) -> None:
    async with orch.generate(chat(rid, model, tokens)) as gen:
        log.setdefault("started", {})[rid] = trio.current_time()
        chunks = 0
        async for event in gen:
            if isinstance(event, GenerateResult):
                log.setdefault("results", {})[rid] = (event.usage.completion_tokens, trio.current_time())
            else:
                chunks += 1
        log.setdefault("decisions", {})[rid] = gen.decision


async def mixed_stream(policy: str, **orchestrator) -> tuple[NeuronDouble, dict]:
    """A at 0, B at 6.5, A at 8, C at 9; each generation takes 1 s, each load 5 s."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), tokens=4, token_delay=0.25, load_delay=5.0)
    log: dict = {}
    async with orchestrating(fleet, swap_policy=policy, min_residency=30.0, **orchestrator) as orch:
        async with trio.open_nursery() as clients:
            for at, rid, model in ((0.0, "a1", "A"), (6.5, "b1", "B"), (8.0, "a2", "A"), (9.0, "c1", "C")):
                await trio.sleep_until(at)
                clients.start_soon(run, orch, rid, model, log)
    return neuron, log


async def test_a_mixed_stream_a_b_a_c_loads_a_once(autojump_clock) -> None:
    neuron, log = await mixed_stream("cost", swap_hold_loads=0.0)  # the configured residency alone
    assert neuron.loads() == ["A", "B", "C"]
    first_token = {rid: t - 0.25 for rid, t in log["started"].items()}  # started = first token, 0.25 s in
    assert first_token["a1"] == 5.0 and first_token["a2"] == 8.0  # a2 found A still resident
    # A stays its 30 s (loaded at 5); then B (waiting longest) for its 30 s, then C.
    assert first_token["b1"] == 40.0 and first_token["c1"] == 75.0
    assert log["decisions"]["b1"].evictions == ("A",) and log["decisions"]["a2"].mode == "local"


async def test_a_residency_of_one_measured_load_time_still_loads_a_once_and_serves_sooner(autojump_clock) -> None:
    neuron, log = await mixed_stream("cost")  # swap_hold_loads 1: held 5 s (a load), not 30
    assert neuron.loads() == ["A", "B", "C"]
    first_token = {rid: t - 0.25 for rid, t in log["started"].items()}
    assert first_token["a2"] == 8.0  # A, loaded at 5, is still resident at 8
    # A gives way at 10 (5 + 5), B loads until 15; B would be held until 20, but c1 has
    # waited 10 s by 19, twice B's hold: B gives way then, C loads until 24.
    assert first_token["b1"] == 15.0 and first_token["c1"] == 24.0


async def test_the_same_stream_under_lru_loads_a_twice(autojump_clock) -> None:
    neuron, _ = await mixed_stream("lru")
    assert neuron.loads() == ["A", "B", "A", "C"]


async def test_a_running_stream_drains_before_its_model_is_evicted(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=20, token_delay=1.0)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, swap_drain=2.0, drain_grace=100.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "long", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(run, orch, "b", "B", log, 1)
            await trio.sleep(3.0)  # B has waited its 2 s: A is draining now
            assert ("n1", "A") in orch.provisioner.draining
            clients.start_soon(run, orch, "late", "A", log, 1)  # no new work goes to a draining model
    assert log["results"]["long"] == (20, 20.0)  # every token, at its own pace
    assert neuron.unloaded_at[0] == ("A", 20.0)
    assert log["started"]["b"] == 21.0 and neuron.loads()[0] == "B"  # its one token took 1 s
    assert log["started"]["late"] > log["results"]["b"][1]  # it waited for A to come back
    unload = next(c for c in neuron.commands if isinstance(c, UnloadModel))
    assert unload.grace == pytest.approx(100.0 - 17.0)  # what was left of the grace


async def test_the_drain_is_bounded_by_its_grace(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=20, token_delay=1.0)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, swap_drain=2.0, drain_grace=5.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "long", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(run, orch, "b", "B", log, 1)
            await trio.sleep(30)
            clients.cancel_scope.cancel()
    unload = next(c for c in neuron.commands if isinstance(c, UnloadModel))
    assert unload.grace == 0.0 and neuron.unloaded_at == [("A", 8.0)]  # swap at 3 s, grace 5 s


async def test_an_operators_unload_waits_for_the_running_stream(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("A",), tokens=10, token_delay=1.0)
    log: dict = {}
    async with orchestrating(fleet) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "s", "A", log)
            await trio.sleep(2.5)
            await orch.unload("n1", "A")
            assert trio.current_time() == 10.0
        text = orch.metrics.render().decode()
    assert log["results"]["s"] == (10, 10.0) and neuron.unloaded_at == [("A", 10.0)]
    assert 'helexa_evictions_total{model="A",reason="operator"} 1.0' in text


async def test_requests_waiting_for_a_load_that_fails_everywhere_fail_at_once(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, load_delay=2.0)
    neuron.refuse_load = True
    async with orchestrating(fleet) as orch:
        with pytest.raises(ColdLoadFailed):
            await run(orch, "x", "A", {})
        assert trio.current_time() == 2.0  # not at its deadline
        assert orch.admission.queue.waiting() == 0


async def test_waiting_requests_are_grouped_onto_one_load(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), tokens=1, token_delay=1.0, load_delay=3.0)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, swap_drain=0.0) as orch:
        async with trio.open_nursery() as clients:
            for i, model in enumerate("ABABAB"):
                clients.start_soon(partial(run, orch, f"{model}{i}", model, log))
                await trio.sleep(0.01)
    # A is loaded for its three, then B for its three: two loads, not six.
    assert neuron.loads() == ["A", "B"]


async def test_a_model_whose_slots_are_all_busy_is_copied_to_a_neuron_with_room(autojump_clock) -> None:
    fleet = Fleet()
    catalogue = Catalogue([CatalogueEntry(id="m", backend="synthetic", memory_mb=500,
                                          config={"metadata": {"n_parallel": 1}})])
    n1 = NeuronDouble("n1", fleet, loaded=("m",), tokens=4, token_delay=1.0)
    n2 = NeuronDouble("n2", fleet, tokens=4, token_delay=1.0, load_delay=1.0)
    orch = Orchestrator(cortex_config(), fleet, catalogue)
    log: dict = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        async with trio.open_nursery() as clients:
            for i in range(3):
                clients.start_soon(run, orch, f"r{i}", "m", log)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert n2.loads() == ["m"] and not n1.loads()
    assert {d.targets[0] for d in log["decisions"].values()} == {"n1", "n2"}
    # r0 on n1 (0-4 s); r1 on the copy, loaded at 1.01 s (1.01-5.01 s); r2 on n1 again (4-8 s), not at 12
    assert sorted(t for _, t in log["results"].values()) == pytest.approx([4.0, 5.01, 8.0])


async def test_a_loads_time_is_the_load_alone_not_the_drain_of_what_it_evicted(autojump_clock) -> None:
    # What eviction weighs is what bringing the model back costs: A's 3 s drain is not B's.
    fleet = Fleet()
    NeuronDouble("n1", fleet, hw=hardware(ram_gb=2), loaded=("A",), tokens=4, token_delay=1.0, load_delay=5.0)
    log: dict = {}
    async with orchestrating(fleet, min_residency=0.0, swap_drain=0.0) as orch:
        async with trio.open_nursery() as clients:
            clients.start_soon(run, orch, "a", "A", log)
            await trio.sleep(1.0)
            clients.start_soon(run, orch, "b", "B", log, 1)
    assert log["results"]["a"][1] == 4.0 and log["started"]["b"] == 10.0  # drained 1-4, loaded 4-9
    assert orch.provisioner.load_times["B"] == 5.0


# Three models, room for two, two slots each; answers take 0.5 s, loads 2 s.
BURST_MODELS = Catalogue([CatalogueEntry(id=m, backend="synthetic", memory_mb=1500,
                                         config={"metadata": {"n_parallel": 2}}) for m in "ABC"])


async def burst(policy: str, seed: int) -> tuple[list[str], list[float]]:
    """The swap benchmark's workload, replayed on virtual time: 60 requests over 15 s for
    A, B and C (50/30/20 %)."""
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, 15.0) for _ in range(60))
    models = ["A"] * 30 + ["B"] * 18 + ["C"] * 12
    rng.shuffle(models)
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=3), tokens=16, token_delay=1 / 32, load_delay=2.0)
    orch = Orchestrator(cortex_config(orchestrator={"swap_policy": policy, "memory_headroom": 1.0}), fleet,
                        BURST_MODELS)
    latencies: list[float] = []
    start = trio.current_time()

    async def one(i: int) -> None:
        await trio.sleep_until(start + arrivals[i])
        async with orch.generate(chat(f"r{i}", models[i])) as gen:
            async for _ in gen:
                pass
        latencies.append(trio.current_time() - start - arrivals[i])

    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        async with trio.open_nursery() as clients:
            for i in range(len(arrivals)):
                clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    return neuron.loads(), sorted(latencies)


async def test_a_burst_of_three_models_loads_fewer_and_is_served_sooner_by_cost_than_by_lru(autojump_clock) -> None:
    runs = {policy: [await burst(policy, seed) for seed in range(4)] for policy in ("cost", "lru")}
    loads = {policy: [m for got, _ in rs for m in got] for policy, rs in runs.items()}
    latencies = {policy: sorted(x for _, lat in rs for x in lat) for policy, rs in runs.items()}
    assert len(latencies["cost"]) == len(latencies["lru"]) == 240
    assert len(loads["cost"]) < len(loads["lru"])
    assert statistics.median(latencies["cost"]) < statistics.median(latencies["lru"])
    assert statistics.mean(latencies["cost"]) < statistics.mean(latencies["lru"])
    # The most popular model is not one of those swapped back and forth.
    assert loads["cost"].count("A") < loads["lru"].count("A")
