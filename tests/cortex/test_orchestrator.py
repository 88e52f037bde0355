"""The orchestrator: the pure choice of target (:func:`decide`), and the shell that acts on
it over neuron doubles (cold loads, failover, peers, feedback)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio

from helexa.protocol import EmbedRequest, GenerateRequest, GenerateResult, Task, TokenChunk, Usage, WorkloadClass
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, Workload
from helexa.roles.cortex.errors import ModelNotFound, NoCapacity, UpstreamError, to_gateway_error
from helexa.roles.cortex.fleet import Fleet, NeuronGone
from helexa.roles.cortex.orchestrator import Orchestrator, decide
from helexa.roles.cortex.scheduler import Hints, NeuronLoad, SchedulerState
from neuron_double import NeuronDouble, hardware
from serving import cortex_config

CHAT = WorkloadClass.CHAT_INTERACTIVE


def loaded(*node_ids: str) -> SchedulerState:
    return SchedulerState(tuple(NeuronLoad(n, True, frozenset({"m"})) for n in node_ids))


def pick(state: SchedulerState = SchedulerState(), *, exclude=frozenset(), catalogued=True, feasible=True,
         peers=False, peer_offers=False):
    return decide(CHAT, Hints("m", frozenset(exclude)), state, catalogued=catalogued, feasible=feasible,
                  peers=peers, peer_offers=peer_offers)


# --- decide: pure --------------------------------------------------------------------------


def test_a_neuron_with_the_model_loaded_wins_over_everything_else() -> None:
    d = pick(loaded("a", "b"), peers=True, peer_offers=True)
    assert d.mode == "local" and d.targets == ("a", "b")


def test_a_catalogued_model_some_neuron_can_hold_is_cold_loaded_here_even_if_a_peer_offers_it() -> None:
    assert pick(peers=True, peer_offers=True).mode == "cold_load"


def test_a_catalogued_model_no_neuron_here_can_hold_goes_to_a_peer_that_offers_it() -> None:
    assert pick(feasible=False, peers=True, peer_offers=True).mode == "peer"


def test_without_an_offer_a_catalogued_model_stays_here_and_gets_the_local_503() -> None:
    assert pick(feasible=False, peers=True, peer_offers=False).mode == "cold_load"
    assert pick(feasible=False, peers=False).mode == "cold_load"


def test_a_model_unknown_here_is_asked_of_the_peers_or_is_not_found() -> None:
    assert pick(catalogued=False, feasible=False, peers=True).mode == "peer"
    assert pick(catalogued=False, feasible=False, peers=False).mode == "none"


def test_a_failed_over_request_never_leaves_for_a_peer() -> None:
    assert pick(loaded("a"), exclude={"a"}, feasible=False, peers=True, peer_offers=True).mode == "cold_load"
    assert pick(loaded("a"), exclude={"a"}, catalogued=False, feasible=False, peers=True).mode == "none"
    assert pick(loaded("a", "b"), exclude={"a"}).targets == ("b",)


def test_every_decision_says_why() -> None:
    for d in (pick(loaded("a")), pick(), pick(feasible=False, peers=True, peer_offers=True),
              pick(catalogued=False, feasible=False)):
        assert d.reason


# --- the shell over doubles ----------------------------------------------------------------

CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=500),
    CatalogueEntry(id="embed", backend="embeddings", memory_mb=100, workloads=(Workload.EMBEDDING,)),
    CatalogueEntry(id="big", backend="synthetic", memory_mb=64 * 1024),
])


def chat(model: str = "chat", rid: str = "r1") -> GenerateRequest:
    return GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": "hi"},))


@asynccontextmanager
async def orchestrating(fleet: Fleet, **fields):
    orch = Orchestrator(cortex_config(**fields), fleet, CATALOGUE)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        yield orch
        nursery.cancel_scope.cancel()


async def collect(orch: Orchestrator, request: GenerateRequest, **kw) -> tuple[str, list[object]]:
    async with orch.generate(request, **kw) as gen:
        events = [e async for e in gen]
    return gen.node_id, events


async def test_generate_cold_loads_then_streams_and_feeds_back(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, tokens=2, load_delay=3)
    async with orchestrating(fleet) as orch:
        node, events = await collect(orch, chat())
    assert node == "n1" and neuron.loads() == ["chat"]
    assert [type(e) for e in events] == [TokenChunk, TokenChunk, GenerateResult]
    assert orch.live.nodes["n1"].in_flight == 0 and orch.live.nodes["n1"].latency is not None


async def test_a_cold_load_calls_on_wait_every_keepalive_interval(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=2.5)
    ticks: list[float] = []

    async def on_wait(status) -> None:  # noqa: ANN001
        assert status.stage == "loading" and status.describe().startswith("loading chat")
        ticks.append(trio.current_time())

    async with orchestrating(fleet, orchestrator={"keepalive_interval": 1.0}) as orch:
        start = trio.current_time()
        await collect(orch, chat(), on_wait=on_wait)
    assert [t - start for t in ticks] == [1.0, 2.0]


async def test_a_neuron_dying_before_the_first_token_fails_over(autojump_clock) -> None:
    fleet = Fleet()
    dying = NeuronDouble("a", fleet, loaded=("chat",))
    dying.fail_before_start = True
    NeuronDouble("b", fleet, loaded=("chat",))
    async with orchestrating(fleet) as orch:
        orch.live.begin("b", "chat", 0.0)  # b looks busier, so a is tried first
        node, events = await collect(orch, chat())
    assert node == "b" and isinstance(events[-1], GenerateResult)


async def test_after_the_first_token_a_failure_is_the_clients(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("a", fleet, loaded=("chat",), tokens=5, token_delay=1.0)
    NeuronDouble("b", fleet, loaded=("chat",))
    async with orchestrating(fleet) as orch:
        orch.live.begin("b", "chat", 0.0)
        with pytest.raises(NeuronGone) as info:
            async with orch.generate(chat()) as gen:
                async for event in gen:
                    neuron.kill()
    assert isinstance(to_gateway_error(info.value), UpstreamError)


async def test_unknown_models_are_not_found_and_impossible_ones_are_503(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("small", fleet, hw=hardware(ram_gb=1))
    async with orchestrating(fleet) as orch:
        with pytest.raises(ModelNotFound):
            await collect(orch, chat("nope"))
        with pytest.raises(NoCapacity):
            await collect(orch, chat("big"))


class _Peer:
    """A remote router whose one peer answers with fixed tokens (a Target)."""

    node_id = "federation"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def can_route(self, model_id: str) -> bool:
        return model_id == "remote"

    def unavailable(self, model_id: str) -> float | None:
        return None

    def listing(self) -> dict:
        return {"remote": {"federated": True, "operators": ["op-b"], "peers": ["p"], "loaded": True}}

    async def route(self, request):  # noqa: ANN001, ANN201
        self.asked.append(request.model_id)
        return self if request.model_id == "remote" else None

    @asynccontextmanager
    async def generate(self, request):  # noqa: ANN001, ANN201
        async def events():
            yield TokenChunk(request.request_id, "far")
            yield GenerateResult(request.request_id, "stop", Usage(1, 1))

        yield events()

    async def embed(self, request, *, timeout):  # noqa: ANN001, ANN201
        raise AssertionError("not used")


async def test_models_only_peers_offer_go_to_the_peer_unless_peers_are_not_allowed(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    peer = _Peer()
    async with orchestrating(fleet) as orch:
        orch.set_remote_router(peer)
        node, events = await collect(orch, chat("remote"))
        assert node == "federation" and events[0].text == "far"
        with pytest.raises(ModelNotFound):
            await collect(orch, chat("remote"), allow_peers=False)  # a peer's request never leaves again
        with pytest.raises(ModelNotFound):
            await collect(orch, chat("unknown"))  # asked, but no peer offers it
        assert peer.asked == ["remote", "unknown"]
        listing = {m["id"]: m for m in orch.models()}
    assert listing["remote"]["federated"] is True and listing["chat"]["locations"] == ["n1"]


async def test_embeddings_go_where_the_embedding_model_is(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    NeuronDouble("n2", fleet, loaded=("embed",))
    async with orchestrating(fleet) as orch:
        result = await orch.embed(EmbedRequest("e1", "embed", ("a", "b")))
    assert result.dim == 3 and len(result.vectors) == 2 * 3 * 4
