"""Eviction by cost and the planning of loads from the whole queue: pure and synchronous.

(The placement rules common to every policy are in ``test_provisioner.py``.)"""

from __future__ import annotations

import pytest

from helexa.roles.cortex.catalogue import CatalogueEntry, Priority
from helexa.roles.cortex.placement import NodeView, NoPlacement, Policy, Resident, place, plan_loads, value, worth
from helexa.roles.cortex.queue import Demand, rank
from neuron_double import hardware

COST = Policy("cost", min_residency=30.0, swap_drain=10.0)


def entry(model_id: str, mb: int = 1000, **kw) -> CatalogueEntry:
    return CatalogueEntry(id=model_id, backend="synthetic", memory_mb=mb, **kw)


def res(model_id: str, mb: int = 1000, **kw) -> Resident:
    kw.setdefault("priority", Priority.NORMAL)
    kw.setdefault("last_used", 0.0)
    return Resident(model_id, mb, False, **kw)


def node(node_id: str, ram_gb: int, *residents: Resident) -> NodeView:
    return NodeView(node_id, hardware(ram_gb=ram_gb), residents)


def need(model_id: str, waiting: int = 1, oldest: float = 0.0, priority: str = "normal") -> Demand:
    return Demand(model_id, waiting, oldest, rank(priority))


# --- which resident gives way ---------------------------------------------------------------


def test_the_cheapest_to_lose_goes_first_not_the_least_recently_used() -> None:
    # "slow" takes 60 s to load and is asked for every other second; "quick" loads in 1 s.
    slow = res("slow", last_used=1.0, load_time=60.0, rate=0.5)
    quick = res("quick", last_used=9.0, load_time=1.0, rate=0.5)
    plan = place(entry("m", 1000), [node("a", 2, slow, quick)], policy=COST, now=100.0)
    assert plan.evict == ("quick",)
    lru = place(entry("m", 1000), [node("a", 2, slow, quick)], policy=Policy("lru"), now=100.0)
    assert lru.evict == ("slow",)


def test_demand_counts_against_eviction_rate_and_queued_work() -> None:
    idle = res("idle", load_time=10.0, rate=0.0, last_used=50.0)
    wanted = res("wanted", load_time=10.0, rate=0.0, queued=3, last_used=1.0)
    assert value(idle) < value(wanted)
    plan = place(entry("m"), [node("a", 2, idle, wanted)], policy=COST, now=100.0, waited=60.0)
    assert plan.evict == ("idle",)


def test_an_unmeasured_model_is_assumed_to_cost_the_default_load_time() -> None:
    assert value(res("x", rate=1.0)) == pytest.approx(10.0)
    assert value(res("x", rate=1.0, load_time=2.0)) == pytest.approx(2.0)


def test_keep_warm_and_pinned_models_stay_under_the_cost_policy() -> None:
    warm = res("warm", keep_warm=True, load_time=0.1)
    pinned = res("pinned", pinned=True, load_time=0.1)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 2, warm, pinned)], policy=COST, now=100.0)
    assert info.value.ever and info.value.retry_at is None


def test_a_model_is_not_evicted_within_its_minimum_residency_and_the_wait_is_known() -> None:
    young = res("young", loaded_at=95.0)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 1, young)], policy=COST, now=100.0)
    assert info.value.retry_at == 125.0  # loaded at 95, resident at least 30 s
    assert place(entry("m", 1000), [node("a", 1, young)], policy=COST, now=125.0).evict == ("young",)


def test_a_resident_models_own_work_drains_first_for_a_bounded_time() -> None:
    busy = res("busy", busy=True)
    queued = res("queued", queued=2)
    for r in (busy, queued):
        with pytest.raises(NoPlacement) as info:
            place(entry("m", 1000), [node("a", 1, r)], policy=COST, now=100.0, waited=4.0)
        assert info.value.retry_at == 106.0  # the newcomer has waited 4 s of the 10
        assert place(entry("m", 1000), [node("a", 1, r)], policy=COST, now=106.0, waited=10.0).evict == (r.model_id,)


def test_requests_running_on_a_model_do_not_add_to_what_losing_it_costs() -> None:
    # They are drained before it unloads, not lost; the requests waiting for it are.
    assert value(res("x", rate=0.5, load_time=2.0, busy=True)) == value(res("x", rate=0.5, load_time=2.0))
    assert value(res("x", rate=0.5, load_time=2.0, queued=6)) == pytest.approx(2.0 * (0.5 + 6 / 60))


def test_a_resident_wanted_more_than_the_waiting_model_is_held_until_the_newcomer_waited_the_drain() -> None:
    popular = res("popular", rate=2.0, load_time=2.0)  # idle, long resident, but asked for twice a second
    rare = Demand("rare", waiting=1, oldest=100.0, priority=1, rate=0.5, load_time=2.0)
    plans, retry = plan_loads([rare], {"rare": entry("rare")}, [node("a", 1, popular)], policy=COST, now=100.0)
    assert plans == [] and retry == 110.0  # the rare model's first request has waited 0 s of the 10
    plans, _ = plan_loads([rare], {"rare": entry("rare")}, [node("a", 1, popular)], policy=COST, now=110.0)
    assert [p.evict for p in plans] == [("popular",)]  # its claim is bounded: no starvation
    wanted = Demand("wanted", waiting=1, oldest=100.0, priority=1, rate=3.0, load_time=2.0)
    plans, _ = plan_loads([wanted], {"wanted": entry("wanted")}, [node("a", 1, popular)], policy=COST, now=100.0)
    assert [p.evict for p in plans] == [("popular",)]  # wanted more than the resident: at once
    assert worth(wanted) == pytest.approx(2.0 * (3.0 + 1 / 60))


def test_a_cheaper_victim_still_protected_is_waited_for_rather_than_a_dearer_one_evicted_now() -> None:
    capped = Policy("cost", min_residency=30.0, swap_drain=10.0, hold_loads=1.0)
    dear = res("dear", rate=2.0, load_time=4.0, loaded_at=0.0)
    cheap = res("cheap", rate=0.1, load_time=4.0, loaded_at=97.0)  # resident until 101
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 2, dear, cheap)], policy=capped, now=98.0, waited=20.0)
    assert info.value.retry_at == 101.0
    plan = place(entry("m", 1000), [node("a", 2, dear, cheap)], policy=capped, now=101.0, waited=23.0)
    assert plan.evict == ("cheap",)
    # Held longer than its drain (4 s: one load time) would be: the dearer one goes now.
    slow = res("cheap", rate=0.1, load_time=20.0, loaded_at=90.0)  # resident until 110
    plan = place(entry("m", 1000), [node("a", 2, dear, slow)], policy=capped, now=98.0, waited=20.0)
    assert plan.evict == ("dear",)


def test_lru_never_evicts_a_busy_model_however_long_the_newcomer_waited() -> None:
    with pytest.raises(NoPlacement):
        place(entry("m", 1000), [node("a", 1, res("busy", busy=True))], policy=Policy("lru"), waited=1e9)


def test_higher_classes_are_never_evicted_under_any_policy() -> None:
    vip = res("vip", priority=Priority.HIGH)
    for policy in (COST, Policy("lru"), Policy("fifo")):
        with pytest.raises(NoPlacement):
            place(entry("m", 1000), [node("a", 1, vip)], policy=policy, now=1e6, waited=1e6)


def test_the_neuron_whose_evictions_cost_least_is_chosen() -> None:
    a = node("a", 1, res("precious", load_time=100.0, rate=1.0))
    b = node("b", 1, res("cheap", load_time=1.0, rate=0.1))
    plan = place(entry("m", 1000), [a, b], policy=COST, now=100.0)
    assert (plan.node_id, plan.evict) == ("b", ("cheap",))


# --- what to load, from the whole queue -----------------------------------------------------


def test_the_cost_policy_loads_by_class_then_by_how_many_wait_then_by_the_longest_wait() -> None:
    roomy = [node("a", 64)]
    entries = {m: entry(m) for m in "abcd"}
    needs = [need("a", 1, oldest=0.0), need("b", 5, oldest=3.0), need("c", 1, oldest=1.0, priority="interactive"),
             need("d", 5, oldest=2.0)]
    plans, _ = plan_loads(needs, entries, roomy, policy=COST, now=10.0)
    assert [p.model_id for p in plans] == ["c", "d", "b", "a"]


def test_one_room_goes_to_one_model_per_round_and_the_rest_wait() -> None:
    full = [node("n", 2, res("old", last_used=0.0), res("older", last_used=0.0))]
    entries = {"x": entry("x", 2000), "y": entry("y", 2000)}
    plans, retry = plan_loads([need("x", 3), need("y", 1)], entries, full, policy=COST, now=100.0)
    assert [(p.model_id, sorted(p.evict)) for p in plans] == [("x", ["old", "older"])]
    assert retry is None  # y waits for the next change (x's requests ending, say)


def test_a_plan_waits_for_the_earliest_protection_to_lapse() -> None:
    nodes = [node("n", 1, res("young", loaded_at=90.0))]
    plans, retry = plan_loads([need("x")], {"x": entry("x")}, nodes, policy=COST, now=100.0)
    assert plans == [] and retry == 120.0


def test_fifo_loads_only_the_oldest_waiters_model_and_blocks_behind_it() -> None:
    entries = {"x": entry("x", 2000), "y": entry("y", 1000)}
    needs = [need("x", oldest=0.0), need("y", oldest=1.0)]
    # x (the oldest) has no room until "busy" ends; y would fit, but FIFO does not serve it first.
    blocked = [node("n", 2, res("busy", 1500, busy=True))]
    assert plan_loads(needs, entries, blocked, policy=Policy("fifo"), now=5.0)[0] == []
    plans, _ = plan_loads(needs, entries, [node("n", 8)], policy=Policy("fifo"), now=5.0)
    assert [p.model_id for p in plans] == ["x"]  # one model at a time


def test_lru_loads_every_waiting_model_it_can_place_at_once() -> None:
    nodes = [node("n", 8)]
    plans, _ = plan_loads([need("x", oldest=1.0), need("y", oldest=0.0)], {"x": entry("x"), "y": entry("y")},
                          nodes, policy=Policy("lru"), now=5.0)
    assert [p.model_id for p in plans] == ["y", "x"]


def test_a_model_no_neuron_can_hold_is_skipped_and_does_not_block_the_others() -> None:
    plans, _ = plan_loads([need("huge", oldest=0.0), need("x", oldest=1.0)],
                          {"huge": entry("huge", 100_000), "x": entry("x")}, [node("n", 4)], policy=Policy("fifo"))
    assert [p.model_id for p in plans] == ["x"]


def test_a_busy_model_gets_another_copy_where_there_is_room_but_never_by_eviction() -> None:
    busy = node("a", 2, res("m", busy=True))
    spare = node("b", 4)
    full = node("c", 1, res("other", last_used=0.0))
    plans, _ = plan_loads([], {"m": entry("m")}, [busy, full, spare], policy=COST, now=100.0,
                          replicas=[need("m", waiting=3)])
    assert [(p.model_id, p.node_id, p.evict) for p in plans] == [("m", "b", ())]
    plans, _ = plan_loads([], {"m": entry("m")}, [busy, full], policy=COST, now=100.0, replicas=[need("m")])
    assert plans == []


def test_residency_and_drain_last_at_most_the_residents_measured_load_time() -> None:
    capped = Policy("cost", min_residency=30.0, swap_drain=10.0, hold_loads=1.0)
    young = res("young", loaded_at=95.0, load_time=4.0)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 1, young)], policy=capped, now=97.0)
    assert info.value.retry_at == 99.0  # loaded at 95, held one 4 s load time (not 30 s)
    assert place(entry("m", 1000), [node("a", 1, young)], policy=capped, now=99.0).evict == ("young",)
    queued = res("queued", queued=3, load_time=2.0)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 1, queued)], policy=capped, now=100.0, waited=0.5)
    assert info.value.retry_at == 101.5  # its own work drains for 2 s of the newcomer's wait, not 10
    twice = Policy("cost", min_residency=30.0, swap_drain=10.0, hold_loads=2.0)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 1, young)], policy=twice, now=97.0)
    assert info.value.retry_at == 103.0
    unmeasured = res("unmeasured", loaded_at=95.0)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 1, unmeasured)], policy=capped, now=100.0)
    assert info.value.retry_at == 125.0  # never measured: the configured residency holds
    slow = res("slow", loaded_at=95.0, load_time=600.0)
    with pytest.raises(NoPlacement) as info:
        place(entry("m", 1000), [node("a", 1, slow)], policy=capped, now=100.0)
    assert info.value.retry_at == 125.0  # the configured residency stays the most


def test_a_residency_ends_once_the_requests_waiting_have_together_waited_twice_the_residents_hold() -> None:
    capped = Policy("cost", min_residency=30.0, swap_drain=10.0, hold_loads=1.0)
    young = res("young", loaded_at=99.0, load_time=2.0)  # held until 101 (one 2 s load)
    few = Demand("m", waiting=1, oldest=99.5, priority=1, arrived_sum=99.5)
    plans, retry = plan_loads([few], {"m": entry("m")}, [node("a", 1, young)], policy=capped, now=100.0)
    assert plans == [] and retry == 101.0  # one request, 0.5 s waited: the residency holds
    # Three requests have waited 1 s each by 100: 3 s of the 4 (twice the hold); at 3 s of
    # waiting a second between them, the 4th comes at 100.33.
    many = Demand("m", waiting=3, oldest=99.0, priority=1, arrived_sum=3 * 99.0)
    plans, retry = plan_loads([many], {"m": entry("m")}, [node("a", 1, young)], policy=capped, now=100.0)
    assert plans == [] and retry == pytest.approx(100.0 + 1 / 3)
    plans, _ = plan_loads([many], {"m": entry("m")}, [node("a", 1, young)], policy=capped, now=100.5)
    assert [p.evict for p in plans] == [("young",)]
    # A resident with requests of its own queued would strand them: the bar rises with them.
    queued = res("queued", loaded_at=99.0, load_time=2.0, queued=2)
    with pytest.raises(NoPlacement):
        place(entry("m"), [node("a", 1, queued)], policy=capped, now=100.5, waited=5.0, pressure=(4.5, 3))
    assert place(entry("m"), [node("a", 1, queued)], policy=capped, now=100.5, waited=5.0,
                 pressure=(12.0, 3)).evict == ("queued",)
    # Without hold_loads the configured residency holds however long they wait.
    plans, retry = plan_loads([many], {"m": entry("m")}, [node("a", 1, young)],
                              policy=Policy("cost", min_residency=30.0, swap_drain=10.0), now=110.0)
    assert plans == [] and retry == 129.0
