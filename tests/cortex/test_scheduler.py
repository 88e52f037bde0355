"""The scheduler: classification and ranking by live load, pure and synchronous."""

from __future__ import annotations

import pytest

from helexa.protocol import Task, WorkloadClass
from helexa.roles.cortex.scheduler import (
    BULK_PROMPT_CHARS,
    Hints,
    LiveLoad,
    NeuronLoad,
    SchedulerState,
    classify,
    schedule,
)


def state(*neurons: NeuronLoad) -> SchedulerState:
    return SchedulerState(tuple(neurons))


def n(node_id: str, *, loaded=("m",), healthy=True, in_flight=0, queued=0, latency=None, errors=0.0) -> NeuronLoad:
    return NeuronLoad(node_id, healthy, frozenset(loaded), in_flight, queued, latency, errors)


@pytest.mark.parametrize(
    ("task", "chars", "max_tokens", "expected"),
    [
        (None, 0, None, WorkloadClass.EMBEDDING),
        (Task.CHAT, 100, 100, WorkloadClass.CHAT_INTERACTIVE),
        (Task.CHAT, BULK_PROMPT_CHARS + 1, None, WorkloadClass.CHAT_BULK),
        (Task.CHAT, 10, 4096, WorkloadClass.CHAT_BULK),
        (Task.COMPLETION, 10, None, WorkloadClass.COMPLETION_INTERACTIVE),
        (Task.COMPLETION, BULK_PROMPT_CHARS + 1, None, WorkloadClass.COMPLETION_BULK),
    ],
)
def test_classifies_by_task_and_size(task, chars, max_tokens, expected) -> None:
    assert classify(task, prompt_chars=chars, max_tokens=max_tokens) is expected


def test_only_healthy_neurons_with_the_model_loaded_are_candidates() -> None:
    s = state(n("a", loaded=()), n("b", healthy=False), n("c"), n("d", loaded=("other",)))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), s).targets == ("c",)


def test_no_candidate_means_no_targets() -> None:
    decision = schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), state(n("a", loaded=())))
    assert decision.targets == ()


def test_prefers_the_least_loaded_neuron() -> None:
    s = state(n("a", in_flight=4), n("b", in_flight=1), n("c", in_flight=2))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), s).targets == ("b", "c", "a")


def test_queue_counts_as_load() -> None:
    s = state(n("a", in_flight=1, queued=5), n("b", in_flight=2))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), s).targets[0] == "b"


def test_prefers_the_faster_neuron_at_equal_load() -> None:
    s = state(n("slow", latency=0.5), n("fast", latency=0.05))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), s).targets == ("fast", "slow")


def test_bulk_work_ignores_latency_and_spreads_by_occupancy() -> None:
    s = state(n("slow", latency=0.5), n("fast", latency=0.05, in_flight=1))
    assert schedule(WorkloadClass.CHAT_BULK, Hints("m"), s).targets[0] == "slow"


def test_neurons_failing_requests_are_avoided() -> None:
    s = state(n("flaky", errors=0.9), n("ok", in_flight=1))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), s).targets == ("ok", "flaky")


def test_excluded_neurons_are_skipped() -> None:
    s = state(n("a"), n("b"))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m", exclude=frozenset({"a"})), s).targets == ("b",)


def test_ties_break_on_preference_then_node_id() -> None:
    s = state(n("b"), n("a"), n("c"))
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m"), s).targets == ("a", "b", "c")
    assert schedule(WorkloadClass.CHAT_INTERACTIVE, Hints("m", prefer=frozenset({"c"})), s).targets[0] == "c"


def test_live_load_tracks_in_flight_latency_errors_and_last_use() -> None:
    live = LiveLoad()
    live.begin("a", "m", now=1.0)
    live.begin("a", "m", now=2.0)
    assert live.nodes["a"].in_flight == 2 and live.model_in_flight[("a", "m")] == 2
    live.end("a", "m", now=3.0, latency=0.1, ok=True)
    live.end("a", "m", now=4.0, latency=0.2, ok=False)
    assert live.nodes["a"].in_flight == 0
    assert live.nodes["a"].latency == pytest.approx(0.1 + 0.2 * 0.1)
    assert live.nodes["a"].error_rate == pytest.approx(0.2)
    assert live.last_used[("a", "m")] == 4.0
    live.forget("a", "m")
    assert ("a", "m") not in live.last_used


def test_snapshot_for_a_model_holds_only_the_neurons_that_have_it_loaded() -> None:
    from types import SimpleNamespace

    from helexa.protocol import ModelState, ModelStatus, NeuronMetrics
    from helexa.roles.cortex.fleet import Health
    from helexa.roles.cortex.scheduler import snapshot

    def link(node_id: str, **models: ModelState) -> SimpleNamespace:
        return SimpleNamespace(node_id=node_id, health=Health.HEALTHY, in_flight=0, metrics=NeuronMetrics(),
                               models={m: ModelStatus(m, st) for m, st in models.items()})

    links = [link("a", m=ModelState.LOADED), link("b", m=ModelState.LOADING), link("c", other=ModelState.LOADED)]
    live = LiveLoad()
    live.begin("a", "m", 0.0)
    state = snapshot(links, live, model_id="m")
    assert [n.node_id for n in state.neurons] == ["a"] and state.neurons[0].in_flight == 1
    assert [n.node_id for n in snapshot(links, live).neurons] == ["a", "b", "c"]


# --- slots and cache-aware routing ---------------------------------------------------------


def c(node_id: str, *, in_flight=0, cached=0, session=False, slots=0, model_in_flight=0, latency=None) -> NeuronLoad:
    return NeuronLoad(node_id, True, frozenset({"m"}), in_flight, 0, latency, 0.0, slots, model_in_flight, cached,
                      session)


CHAT = WorkloadClass.CHAT_INTERACTIVE


def test_a_neuron_whose_slots_are_all_taken_is_not_a_target_and_all_busy_means_queue() -> None:
    s = state(c("a", slots=2, model_in_flight=2), c("b", slots=2, model_in_flight=1))
    assert schedule(CHAT, Hints("m"), s).targets == ("b",)
    full = state(c("a", slots=2, model_in_flight=2))
    d = schedule(CHAT, Hints("m"), full)
    assert d.targets == () and d.mode == "queue" and "busy" in d.reason


def test_without_load_pressure_the_neuron_holding_the_longest_prefix_wins() -> None:
    s = state(c("a", cached=2), c("b", cached=9), c("c", cached=0))
    d = schedule(CHAT, Hints("m", blocks=10), s, max_skew=2)
    assert d.targets[0] == "b" and (d.cache, d.matched, d.blocks) == ("hit", 9, 10)


def test_under_load_pressure_a_busy_cache_holder_loses_to_the_least_busy() -> None:
    s = state(c("hot", cached=9, in_flight=4), c("cold", cached=0, in_flight=1))
    d = schedule(CHAT, Hints("m", blocks=10), s, max_skew=2)
    assert d.targets[0] == "cold" and d.cache == "miss"
    # within the bound, the cache still wins
    s = state(c("hot", cached=9, in_flight=3), c("cold", cached=0, in_flight=1))
    assert schedule(CHAT, Hints("m", blocks=10), s, max_skew=2).targets[0] == "hot"


def test_the_sessions_neuron_comes_before_a_longer_prefix_elsewhere() -> None:
    s = state(c("a", cached=9), c("b", session=True))
    d = schedule(CHAT, Hints("m", blocks=10), s, max_skew=2)
    assert d.targets[0] == "b" and d.cache == "session"


def test_with_nothing_cached_it_is_least_busy_routing() -> None:
    s = state(c("a", in_flight=2), c("b", in_flight=0), c("c", in_flight=1))
    aware = schedule(CHAT, Hints("m", blocks=10), s, max_skew=2)
    assert aware.targets == schedule(CHAT, Hints("m"), s).targets == ("b", "c", "a")
    assert aware.cache == "miss"


def test_least_busy_mode_ignores_the_cache() -> None:
    s = state(c("a", cached=9, in_flight=1), c("b"))
    d = schedule(CHAT, Hints("m", blocks=10), s)
    assert d.targets[0] == "b" and d.cache == "none"


def test_the_demand_rate_decays() -> None:
    live = LiveLoad()
    for t in range(60):
        live.arrived("m", float(t))
    assert live.rate("m", 59.0) == pytest.approx(0.63, abs=0.02)
    assert live.rate("m", 59.0 + 600) < 0.001 and live.rate("other", 0.0) == 0.0


def test_a_new_conversation_goes_where_it_pushes_no_other_out_of_the_cache() -> None:
    # "full" holds the shared system prompt (4 blocks) in every slot it has, each with another
    # conversation behind it; "spare" has a free slot.
    full = NeuronLoad("full", True, frozenset({"m"}), cached=4, room=False)
    spare = NeuronLoad("spare", True, frozenset({"m"}), cached=0, room=True)
    d = schedule(CHAT, Hints("m", blocks=10), state(full, spare), max_skew=2)
    assert d.targets[0] == "spare" and d.cache == "miss" and "push out another conversation" in d.reason
    # A conversation going on with its own chain has room where that chain is.
    mine = NeuronLoad("mine", True, frozenset({"m"}), cached=9, room=True)
    assert schedule(CHAT, Hints("m", blocks=10), state(mine, spare), max_skew=2).targets[0] == "mine"
    # With no room anywhere, the longest prefix wins as before.
    other = NeuronLoad("other", True, frozenset({"m"}), cached=2, room=False)
    assert schedule(CHAT, Hints("m", blocks=10), state(full, other), max_skew=2).targets[0] == "full"
