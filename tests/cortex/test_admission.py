"""The admission queue in the orchestrator's shell, over neuron doubles on trio's virtual clock:
requests beyond the slots wait and all complete, in priority order and fairly, until their
deadlines at exact virtual times, telling their clients where they stand."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.errors import NoCapacity
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator, Tenant, WaitStatus
from neuron_double import NeuronDouble
from serving import cortex_config

ONE_SLOT = Catalogue([CatalogueEntry(id="m", backend="synthetic", memory_mb=100,
                                     config={"metadata": {"n_parallel": 1}})])


@asynccontextmanager
async def orchestrating(fleet: Fleet, catalogue: Catalogue = ONE_SLOT, **orchestrator):
    orch = Orchestrator(cortex_config(orchestrator=orchestrator), fleet, catalogue)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        yield orch
        nursery.cancel_scope.cancel()


def chat(rid: str, tokens: int | None = None, model: str = "m") -> GenerateRequest:
    return GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": rid},),
                           sampling=SamplingParams(max_tokens=tokens))


class Recorder:
    """Runs requests and records when each started streaming and finished."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.started: list[str] = []
        self.finished: dict[str, float] = {}
        self.errors: dict[str, BaseException] = {}
        self.ticks: dict[str, list[WaitStatus]] = {}

    async def run(self, rid: str, *, tenant: Tenant = Tenant(), tokens: int | None = None, **kw) -> None:
        async def on_wait(status: WaitStatus) -> None:
            self.ticks.setdefault(rid, []).append(status)

        try:
            async with self.orch.generate(chat(rid, tokens), tenant=tenant, on_wait=on_wait, **kw) as gen:
                self.started.append(rid)
                async for event in gen:
                    if isinstance(event, GenerateResult):
                        self.finished[rid] = trio.current_time()
        except NoCapacity as exc:
            self.errors[rid] = exc


async def test_requests_beyond_the_slots_wait_and_all_complete_in_order(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("m",), tokens=4, token_delay=0.25)  # 1 s a request
    peak = 0
    async with orchestrating(fleet) as orch:
        rec = Recorder(orch)

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, neuron.in_flight)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as clients:
                for i in range(5):
                    clients.start_soon(rec.run, f"r{i}")
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert rec.started == [f"r{i}" for i in range(5)] and not rec.errors
    assert peak == 1  # the one slot, never two at once
    assert [round(rec.finished[f"r{i}"]) for i in range(5)] == [1, 2, 3, 4, 5]
    assert orch.admission.queue.waiting() == 0 and not orch.admission.reserved


async def test_interactive_overtakes_normal_overtakes_bulk(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=4, token_delay=0.25)
    async with orchestrating(fleet) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            clients.start_soon(rec.run, "first")
            await trio.sleep(0.1)
            for rid, priority in (("bulk", "bulk"), ("normal", "normal"), ("interactive", "interactive")):
                clients.start_soon(partial(rec.run, rid, tenant=Tenant(priority=priority)))
                await trio.sleep(0.1)
    assert rec.started == ["first", "interactive", "normal", "bulk"]


TWO_SLOTS = Catalogue([CatalogueEntry(id="m", backend="synthetic", memory_mb=100,
                                      config={"metadata": {"n_parallel": 2}})])


@pytest.mark.parametrize("held", [0, 1])
async def test_interactive_slots_keep_a_slot_for_an_interactive_request_while_bulk_work_runs(autojump_clock,
                                                                                            held) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=4, token_delay=1.0)  # 4 s a request
    async with orchestrating(fleet, TWO_SLOTS, interactive_slots=held) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            for rid, priority, at in (("bulk0", "bulk", 0.0), ("bulk1", "bulk", 0.1), ("normal", "normal", 0.2),
                                      ("chat", "interactive", 1.0)):
                await trio.sleep_until(at)
                clients.start_soon(partial(rec.run, rid, tenant=Tenant(priority=priority)))
    began = {rid: round(t - 4.0, 1) for rid, t in rec.finished.items()}  # each ran 4 s
    assert not rec.errors
    if held:
        # one slot is kept free: the lower classes run one at a time (normal before bulk), and
        # not while the chat runs; the chat starts at once
        assert rec.started == ["bulk0", "chat", "normal", "bulk1"]
        assert began == {"bulk0": 0.0, "chat": 1.0, "normal": 5.0, "bulk1": 9.0}
    else:
        # every class may fill every slot: the chat waits for a bulk request to end
        assert rec.started == ["bulk0", "bulk1", "chat", "normal"]
        assert began == {"bulk0": 0.0, "bulk1": 0.1, "chat": 4.0, "normal": 4.1}


def test_interactive_slots_hold_back_from_the_lower_classes_only_and_never_every_slot() -> None:
    from helexa.roles.cortex.scheduler import slots_for

    assert [slots_for(4, p, 1) for p in (0, 1, 2)] == [4, 3, 3]
    assert [slots_for(2, p, 5) for p in (0, 1, 2)] == [2, 1, 1]  # one slot always stays open
    assert slots_for(0, 2, 1) == 0 and slots_for(3, 2, 0) == 3  # slots unknown; nothing held


async def test_one_tenants_burst_does_not_starve_anothers_trickle(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=1, token_delay=1.0)
    async with orchestrating(fleet) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            for i in range(8):
                clients.start_soon(partial(rec.run, f"big{i}", tenant=Tenant("big", "k1")))
                await trio.sleep(0.01)
            for i in range(2):
                clients.start_soon(partial(rec.run, f"small{i}", tenant=Tenant("small", "k2")))
                await trio.sleep(0.01)
    # big0 took the slot; then the two portals alternate while both wait.
    assert rec.started[:5] == ["big0", "big1", "small0", "big2", "small1"]


async def test_a_weighted_portal_gets_its_share_of_turns(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=1, token_delay=1.0)
    async with orchestrating(fleet) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            clients.start_soon(rec.run, "hold")
            await trio.sleep(0.01)
            for i in range(6):
                clients.start_soon(partial(rec.run, f"gold{i}", tenant=Tenant("gold", weight=2.0)))
                clients.start_soon(partial(rec.run, f"basic{i}", tenant=Tenant("basic", weight=1.0)))
                await trio.sleep(0.01)
    first_six = [rid.rstrip("0123456789") for rid in rec.started[1:7]]
    assert first_six.count("gold") == 4 and first_six.count("basic") == 2


async def test_a_request_waits_until_its_deadline_exactly_then_gets_503_with_retry_after(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=100, token_delay=1.0)
    async with orchestrating(fleet, queue_timeout=5.0, retry_after=7.0) as orch:
        rec = Recorder(orch)
        refused_at: dict[str, float] = {}

        async def timed(rid: str, **kw) -> None:
            await rec.run(rid, **kw)
            refused_at[rid] = trio.current_time()

        async with trio.open_nursery() as clients:
            clients.start_soon(rec.run, "long")
            await trio.sleep(1.0)
            start = trio.current_time()
            clients.start_soon(timed, "config")
            clients.start_soon(partial(timed, "own", queue_timeout=2.0))
            await trio.sleep(10)
            clients.cancel_scope.cancel()
    assert refused_at["own"] - start == 2.0 and refused_at["config"] - start == 5.0
    for rid in ("own", "config"):
        err = rec.errors[rid]
        assert err.code == "queue_timeout" and err.retry_after == 7.0  # nothing drained yet: the default
        assert dict(err.headers())[b"retry-after"] == b"7"
    assert orch.admission.queue.waiting() == 0


async def test_a_full_queue_refuses_at_once(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=100, token_delay=1.0)
    async with orchestrating(fleet, max_queue=1) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            clients.start_soon(rec.run, "running")
            await trio.sleep(0.1)
            clients.start_soon(rec.run, "waiting")
            await trio.sleep(0.1)
            before = trio.current_time()
            await rec.run("refused")
            assert trio.current_time() == before
            clients.cancel_scope.cancel()
    assert rec.errors["refused"].code == "queue_full" and "waiting" not in rec.errors


async def test_one_tenants_flood_of_a_full_queue_does_not_lock_out_another(autojump_clock) -> None:
    # A bulk portal's key fills the whole queue; an interactive portal's request and another
    # bulk portal's still get in: the flood's last waiter gives its place (503 queue_full),
    # and the flood's next request is refused at once as before.
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=1, token_delay=1.0)
    flood = Tenant("bulk", "k1", "bulk")
    async with orchestrating(fleet, max_queue=3) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            for i in range(4):  # one runs, three wait
                clients.start_soon(partial(rec.run, f"flood{i}", tenant=flood))
                await trio.sleep(0.01)
            await rec.run("flood4", tenant=flood)
            clients.start_soon(partial(rec.run, "chat", tenant=Tenant("app", "k2", "interactive")))
            await trio.sleep(0.01)
            clients.start_soon(partial(rec.run, "batch", tenant=Tenant("other", "k3", "bulk")))
            await trio.sleep(0.01)
        text = orch.metrics.render().decode()
    assert set(rec.errors) == {"flood4", "flood3", "flood2"}
    assert all(e.code == "queue_full" for e in rec.errors.values())
    assert "gave its place" in str(rec.errors["flood3"]) and rec.errors["flood3"].retry_after > 0
    assert rec.started == ["flood0", "chat", "flood1", "batch"]
    assert orch.admission.queue.waiting() == 0 and not orch.admission._tickets
    assert 'helexa_queue_length{model="m",portal="bulk"} 0.0' in text


async def test_retry_after_follows_the_measured_drain_rate(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=2, token_delay=1.0)  # 2 s a request
    async with orchestrating(fleet, max_queue=3) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            for i in range(4):  # one runs, three wait
                clients.start_soon(rec.run, f"r{i}")
                await trio.sleep(0.001)
            await trio.sleep(4.5)  # two have left the queue since, one every 2 s
            refill = [f"again{i}" for i in range(2)]
            for rid in refill:
                clients.start_soon(rec.run, rid)
                await trio.sleep(0.001)
            await rec.run("refused")
            clients.cancel_scope.cancel()
    # two services 2 s apart: 0.5/s; three waiting, and this one: 8 s.
    assert rec.errors["refused"].retry_after == pytest.approx(8.0)


async def test_waiting_clients_are_told_their_position_and_estimate_on_every_tick(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=2, token_delay=1.0)
    async with orchestrating(fleet, keepalive_interval=1.0) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            for i in range(4):
                clients.start_soon(rec.run, f"r{i}")
                await trio.sleep(0.001)
    # r3 arrived at 3 ms: ticks at 1.003, 2.003 ... 5.003 s; r1 left the queue at 2 s, r2 at 4 s
    last = rec.ticks["r3"]
    assert [t.position for t in last] == [3, 2, 2, 1, 1]
    assert all(t.stage == "queued" for t in last) and "r0" not in rec.ticks
    assert [t.eta for t in last[:3]] == [None] * 3  # two services are needed to measure a rate
    assert last[3].eta == last[4].eta == pytest.approx(2.0)  # one served every 2 s, position 1
    assert last[-1].describe() == "queued for m: position 1, ~2s"


async def test_a_client_that_leaves_gives_up_its_place(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=2, token_delay=1.0)
    async with orchestrating(fleet) as orch:
        rec = Recorder(orch)
        async with trio.open_nursery() as clients:
            clients.start_soon(rec.run, "r0")
            await trio.sleep(0.1)
            with trio.move_on_after(0.5):
                await rec.run("leaver")
            clients.start_soon(rec.run, "r2")
        text = orch.metrics.render().decode()
    assert rec.started == ["r0", "r2"]
    assert 'helexa_queue_length{model="m",portal="default"} 0.0' in text


async def test_the_decision_says_how_long_it_waited_and_metrics_show_the_queue(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",), tokens=2, token_delay=1.0)
    decisions = {}
    async with orchestrating(fleet) as orch:
        async def one(rid: str) -> None:
            async with orch.generate(chat(rid), tenant=Tenant("p1")) as gen:
                decisions[rid] = gen.decision
                async for _ in gen:
                    pass

        async with trio.open_nursery() as clients:
            clients.start_soon(one, "a")
            await trio.sleep(0.001)
            clients.start_soon(one, "b")
        text = orch.metrics.render().decode()
    assert decisions["a"].mode == "local" and decisions["a"].waited is None
    assert decisions["b"].mode == "queue" and decisions["b"].waited == pytest.approx(2.0, abs=0.01)
    assert 'helexa_queue_wait_seconds_count{model="m",portal="p1"} 1.0' in text
    assert 'helexa_routing_decisions_total{cache="miss",mode="local",model="m"} 1.0' in text


async def test_a_portals_priority_and_key_reach_the_queue_through_the_gateway(autojump_clock) -> None:
    # The metered path hands the orchestrator the portal's tenant: its priority class orders
    # the queue, and the queue's metrics are labelled with the portal.
    import httpx

    from helexa.roles.cortex.portal.store import SqliteStore
    from portals import acme, bearer, new_key, portals

    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=2, token_delay=1.0)
    store = SqliteStore(":memory:")
    bulk_key, fast_key = new_key(store, "batch"), new_key(store, "live")
    tables = {"batch": acme(priority="bulk"), "live": acme(priority="interactive")}
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    statuses: list[int] = []
    async with portals(fleet, tables, store=store, virtual=True, orchestrator={"default_slots": 1}) as (gw, urls):
        async def ask(portal: str, key: str, rid: str) -> None:
            async with httpx.AsyncClient(base_url=urls[portal], headers=bearer(key), timeout=60) as http:
                r = await http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user",
                                                                                          "content": rid}]})
                statuses.append(r.status_code)

        async with trio.open_nursery() as clients:
            clients.start_soon(ask, "batch", bulk_key, "b0")
            await trio.sleep(0.5)  # b0 holds the one slot until t=2
            for i in (1, 2):
                clients.start_soon(ask, "batch", bulk_key, f"b{i}")
                await trio.sleep(0.1)
            clients.start_soon(ask, "live", fast_key, "live")
        text = gw.orchestrator.metrics.render().decode()
    order = [r.messages[-1]["content"] for r in neuron.requests]
    assert statuses == [200] * 4 and order == ["b0", "live", "b1", "b2"]
    assert 'helexa_queue_wait_seconds_count{model="chat",portal="batch"} 2.0' in text
    assert 'helexa_queue_wait_seconds_count{model="chat",portal="live"} 1.0' in text


def test_a_neuron_stays_excluded_until_the_model_is_loaded_there_again_after_the_failure() -> None:
    from helexa.roles.cortex.admission import excluded

    fleet = Fleet()
    a = NeuronDouble("a", fleet, loaded=("m",))
    NeuronDouble("b", fleet, loaded=("m",))
    failed = (("a", 5.0), ("b", 5.0), ("gone", 5.0))
    assert excluded(failed, "m", fleet) == {"a", "b", "gone"}
    a.loaded_since["m"] = 5.0  # loaded as it failed: the same instance
    assert excluded(failed, "m", fleet) == {"a", "b", "gone"}
    a.loaded_since["m"] = 7.5  # loaded again since: a new instance
    assert excluded(failed, "m", fleet) == {"b", "gone"}
    assert excluded(failed, "other", fleet) == {"a", "b", "gone"}
