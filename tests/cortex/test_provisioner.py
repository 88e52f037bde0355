"""Placement, eviction, idle unloading and single-flight cold loads.

The pure core is tested synchronously; the shell against in-memory neuron doubles under
trio's autojump clock, asserting exact virtual times.
"""

from __future__ import annotations

import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, Priority
from helexa.roles.cortex.errors import BadRequest, ColdLoadFailed, ModelNotFound, NoCapacity, NotFound
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.config import OrchestratorConfig
from helexa.roles.cortex.placement import NodeView, NoPlacement, Resident, Unload, idle_unloads, place, warm_loads
from helexa.roles.cortex.provisioner import Provisioner
from helexa.roles.cortex.scheduler import LiveLoad
from neuron_double import NeuronDouble, hardware


def entry(model_id: str, mb: int = 1000, **kw) -> CatalogueEntry:
    return CatalogueEntry(id=model_id, backend="synthetic", memory_mb=mb, **kw)


def res(model_id: str, mb: int = 1000, *, priority=Priority.NORMAL, last_used=0.0, busy=False, evictable=True):
    return Resident(model_id, mb, False, priority, last_used, busy, evictable)


def node(node_id: str, ram_gb: int = 4, *residents: Resident) -> NodeView:
    return NodeView(node_id, hardware(ram_gb=ram_gb), residents)


# --- pure placement ----------------------------------------------------------------------


def test_places_on_a_neuron_with_room_without_evicting() -> None:
    nodes = [node("a", 4, res("x", 3500)), node("b", 4)]
    assert place(entry("m"), nodes) == place(entry("m"), nodes[::-1])
    plan = place(entry("m"), nodes)
    assert (plan.node_id, plan.evict) == ("b", ())


def test_pinned_neurons_come_first_even_if_they_must_evict() -> None:
    nodes = [node("free", 4), node("pin", 4, res("x", 3500))]
    plan = place(entry("m", pinned_on=("pin",)), nodes)
    assert (plan.node_id, plan.evict) == ("pin", ("x",))


def test_falls_back_from_an_infeasible_pinned_neuron() -> None:
    nodes = [node("pin", 1), node("other", 8)]
    assert place(entry("m", 2000, pinned_on=("pin",)), nodes).node_id == "other"


def test_evicts_least_recently_used_first_and_only_as_much_as_needed() -> None:
    residents = (res("old", 1500, last_used=1.0), res("mid", 1500, last_used=5.0), res("new", 1000, last_used=9.0))
    plan = place(entry("m", 1500), [node("a", 4, *residents)])
    assert plan.evict == ("old",)
    plan = place(entry("m", 2500), [node("a", 4, *residents)])
    assert plan.evict == ("old", "mid")


def test_never_evicts_a_higher_priority_class() -> None:
    residents = (res("vip", 3000, priority=Priority.HIGH, last_used=0.0), res("peer", 1000, last_used=5.0))
    plan = place(entry("m", 1000), [node("a", 4, *residents)])
    assert plan.evict == ("peer",)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 2000), [node("a", 4, *residents)])
    assert info.value.ever


def test_evicts_lower_classes_for_a_higher_class() -> None:
    residents = (res("low", 2000, priority=Priority.LOW, last_used=9.0), res("norm", 2000, last_used=1.0))
    plan = place(entry("m", 2000, priority=Priority.HIGH), [node("a", 4, *residents)])
    assert plan.evict == ("norm",)
    plan = place(entry("m", 2000, priority=Priority.LOW), [node("a", 4, *residents)])
    assert plan.evict == ("low",)


def test_never_evicts_busy_or_unknown_models() -> None:
    residents = (res("busy", 2000, busy=True), res("foreign", 2000, evictable=False))
    with pytest.raises(NoPlacement):
        place(entry("m", 1000), [node("a", 4, *residents)])


def test_prefers_a_neuron_that_needs_no_eviction_then_the_least_evicted() -> None:
    a = node("a", 4, res("x", 3500))
    b = node("b", 4, res("y", 2000), res("z", 1600, last_used=1.0))
    assert place(entry("m", 1000), [a, b]) .node_id == "b"
    c = node("c", 8)
    assert place(entry("m", 1000), [a, b, c]).node_id == "c"


def test_headroom_keeps_part_of_memory_free() -> None:
    with pytest.raises(NoPlacement):
        place(entry("m", 4000), [node("a", 4)], headroom=0.9)
    assert place(entry("m", 3600), [node("a", 4)], headroom=0.9).node_id == "a"


def test_no_hardware_anywhere_is_not_placeable_ever() -> None:
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 10_000), [node("a", 4)])
    assert not info.value.ever
    with pytest.raises(NoPlacement):
        place(entry("m"), [])


def test_gpu_models_count_only_gpu_memory() -> None:
    gpu = NodeView("g", hardware(ram_gb=1, gpus=(24,)), (res("cpu-model", 900),))
    plan = place(entry("m", 20_000, min_devices=1), [gpu])
    assert plan.evict == ()


def test_idle_unloads_fall_due_at_last_use_plus_ttl() -> None:
    cat = Catalogue([entry("a", idle_ttl=100), entry("b", idle_ttl=50), entry("warm", idle_ttl=10, keep_warm=True),
                     entry("never")])
    nodes = [node("n", 8, res("a", last_used=10.0), res("b", last_used=20.0), res("warm"), res("never"))]
    assert idle_unloads(cat, nodes, 69.0) == ([], 70.0)
    assert idle_unloads(cat, nodes, 70.0) == ([Unload("n", "b")], 110.0)
    busy = [node("n", 8, res("a", last_used=10.0, busy=True))]
    assert idle_unloads(cat, busy, 500.0) == ([], 600.0)


def test_warm_loads_lists_keep_warm_models_resident_nowhere() -> None:
    cat = Catalogue([entry("w1", keep_warm=True), entry("w2", keep_warm=True), entry("cold")])
    assert warm_loads(cat, [node("n", 8, res("w2"))]) == ["w1"]


# --- the shell ---------------------------------------------------------------------------


async def start(fleet: Fleet, cat: Catalogue, nursery: trio.Nursery, **settings) -> Provisioner:
    prov = Provisioner(fleet, cat, LiveLoad(), OrchestratorConfig(**settings))
    await nursery.start(prov.run)
    return prov


async def test_twenty_racing_requests_cause_exactly_one_load(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, load_delay=5.0)
    cat = Catalogue([entry("m")])
    results = []
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, cat, nursery)

        async def request() -> None:
            results.append((await prov.ensure_loaded("m"), trio.current_time()))

        async with trio.open_nursery() as requests:
            for _ in range(20):
                requests.start_soon(request)
        nursery.cancel_scope.cancel()
    assert neuron.loads() == ["m"]
    assert results == [("n1", 5.0)] * 20


async def test_waiters_time_out_while_the_load_goes_on(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, load_delay=10.0)
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, Catalogue([entry("m")]), nursery, cold_load_wait=3.0, retry_after=7.0)
        with pytest.raises(NoCapacity) as info:
            await prov.ensure_loaded("m")
        assert trio.current_time() == 3.0 and info.value.retry_after == 7.0
        assert await prov.ensure_loaded("m", timeout=60) == "n1"
        assert trio.current_time() == 10.0
        nursery.cancel_scope.cancel()
    assert neuron.loads() == ["m"]


async def test_a_refused_load_moves_to_the_next_neuron(autojump_clock) -> None:
    fleet = Fleet()
    bad = NeuronDouble("a", fleet)
    bad.refuse_load = True
    good = NeuronDouble("b", fleet)
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, Catalogue([entry("m")]), nursery)
        assert await prov.ensure_loaded("m") == "b"
        bad2 = NeuronDouble("c", Fleet())
        nursery.cancel_scope.cancel()
    assert bad.loads() == ["m"] and good.loads() == ["m"] and not bad2.loads()


async def test_every_neuron_refusing_is_load_failed(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("a", fleet).refuse_load = True
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, Catalogue([entry("m")]), nursery)
        with pytest.raises(ColdLoadFailed):
            await prov.ensure_loaded("m")
        nursery.cancel_scope.cancel()


async def test_unknown_and_unplaceable_models(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("a", fleet, hw=hardware(ram_gb=1))
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, Catalogue([entry("huge", 50_000)]), nursery)
        with pytest.raises(ModelNotFound):
            await prov.ensure_loaded("nope")
        with pytest.raises(NoCapacity, match="hardware"):
            await prov.ensure_loaded("huge")
        nursery.cancel_scope.cancel()


async def test_a_cold_load_evicts_the_lru_model_of_a_lower_class_first(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("a", fleet, hw=hardware(ram_gb=4))
    cat = Catalogue([entry("x", 1000), entry("y", 1000), entry("vip", 1000, priority=Priority.HIGH),
                     entry("new", 1500)])
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, cat, nursery, memory_headroom=1.0, swap_policy="lru")
        for model in ("vip", "x", "y"):
            await prov.ensure_loaded(model)
            await trio.sleep(1)
        prov.live.touch("a", "x", trio.current_time())  # x used after y: y is the LRU
        await prov.ensure_loaded("new")
        nursery.cancel_scope.cancel()
    assert neuron.unloads() == ["y"]
    assert set(neuron.models) == {"vip", "x", "new"}


async def test_idle_models_unload_exactly_at_their_ttl(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("a", fleet)
    cat = Catalogue([entry("m", idle_ttl=300)])
    unloaded_at = []
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, cat, nursery)
        await prov.ensure_loaded("m")
        await trio.sleep(100)
        prov.live.touch("a", "m", trio.current_time())  # used at t=100: due at 400
        while "m" in neuron.models:
            await fleet.wait_changed()
        unloaded_at.append(trio.current_time())
        nursery.cancel_scope.cancel()
    assert unloaded_at == [400.0]
    assert neuron.unloads() == ["m"]


async def test_a_busy_model_is_not_unloaded_for_idleness(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("a", fleet, loaded=("m",))
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, Catalogue([entry("m", idle_ttl=10)]), nursery)
        prov.live.begin("a", "m", 0.0)
        await trio.sleep(50)
        assert neuron.unloads() == []
        prov.live.end("a", "m", trio.current_time(), latency=0.1, ok=True)  # t=50: due at 60
        await trio.sleep(9.5)
        assert neuron.unloads() == []
        await trio.sleep(0.5 + 1e-6)
        nursery.cancel_scope.cancel()
    assert neuron.unloads() == ["m"]


async def test_keep_warm_models_load_at_start_up_and_when_a_neuron_joins(autojump_clock) -> None:
    fleet = Fleet()
    cat = Catalogue([entry("warm", keep_warm=True, idle_ttl=5), entry("cold")])
    async with trio.open_nursery() as nursery:
        await start(fleet, cat, nursery, warm_start_delay=0)
        await trio.sleep(1)
        neuron = NeuronDouble("a", fleet, load_delay=2.0)  # joins after start-up
        await trio.sleep(3.0)
        assert neuron.loads() == ["warm"]
        await trio.sleep(1000)
        nursery.cancel_scope.cancel()
    assert neuron.unloads() == []


async def test_a_failed_keep_warm_load_is_retried_later(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("a", fleet)
    neuron.refuse_load = True
    async with trio.open_nursery() as nursery:
        await start(fleet, Catalogue([entry("warm", keep_warm=True)]), nursery, warm_retry=30.0, warm_start_delay=0)
        await trio.sleep(1)
        assert neuron.loads() == ["warm"]
        neuron.refuse_load = False
        await trio.sleep(28.5)  # t=29.5
        assert neuron.loads() == ["warm"]
        await trio.sleep(1)  # the retry falls due at t=30
        nursery.cancel_scope.cancel()
    assert neuron.loads() == ["warm", "warm"] and "warm" in neuron.models


async def test_the_operator_loads_on_a_chosen_neuron_pins_and_unloads(autojump_clock) -> None:
    fleet = Fleet()
    a, b = NeuronDouble("a", fleet), NeuronDouble("b", fleet, load_delay=3.0)
    cat = Catalogue([entry("m", idle_ttl=60)])
    async with trio.open_nursery() as nursery:
        prov = await start(fleet, cat, nursery)
        prov.operator.begin_load_on("m", "b")  # placement alone would pick "a"
        with pytest.raises(BadRequest):
            prov.operator.begin_load_on("m", "b")  # already loading
        assert await prov.ensure_loaded("m") == "b" and trio.current_time() == 3.0  # requests join that load
        prov.operator.pin("m", "b")
        await trio.sleep(600)
        assert "m" in b.models  # pinned: never idle-unloaded
        prov.operator.begin_unload_from("m", "b")
        while "m" in b.models:
            await fleet.wait_changed()
        assert "m" not in prov.operator.pins()
        with pytest.raises(NotFound):
            prov.operator.begin_unload_from("m", "b")
        with pytest.raises(NotFound):
            prov.operator.begin_load_on("m", "nobody")
        with pytest.raises(ModelNotFound):
            prov.operator.begin_load_on("unknown", "a")
        nursery.cancel_scope.cancel()
    assert a.loads() == [] and b.loads() == ["m"] and b.unloads() == ["m"]


async def test_keep_warm_loads_wait_for_neurons_to_rejoin_after_a_start(autojump_clock) -> None:
    fleet = Fleet()
    other = NeuronDouble("other", fleet)  # rejoins first, holding nothing
    async with trio.open_nursery() as nursery:
        await start(fleet, Catalogue([entry("warm", keep_warm=True)]), nursery, warm_start_delay=5.0)
        await trio.sleep(2.0)
        NeuronDouble("holder", fleet, loaded=("warm",))  # rejoins holding it
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    assert other.loads() == []  # nothing loaded twice


async def test_a_keep_warm_model_nobody_holds_loads_when_the_start_delay_ends(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("a", fleet)
    async with trio.open_nursery() as nursery:
        await start(fleet, Catalogue([entry("warm", keep_warm=True)]), nursery, warm_start_delay=5.0)
        await trio.sleep(4.9)
        assert neuron.loads() == []
        await trio.sleep(0.2)
        assert neuron.loads() == ["warm"]
        nursery.cancel_scope.cancel()


def test_housekeeping_uses_only_the_provisioners_public_interface() -> None:
    # One owner per state: housekeeping asks the provisioner, it does not reach into it.
    import ast
    import inspect

    from helexa.roles.cortex import housekeeping

    tree = ast.parse(inspect.getsource(housekeeping))
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr.startswith("_") and not node.attr.startswith("__")
                      and ((isinstance(node.value, ast.Name) and node.value.id == "p")
                           or (isinstance(node.value, ast.Attribute) and node.value.attr == "provisioner"))})
    assert private == []
