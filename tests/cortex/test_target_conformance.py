"""One contract for "something that runs a generation" (:class:`~helexa.roles.cortex.dispatch.Target`),
run against every implementation, so that a test double can never drift from the real thing.

The implementations:

* ``link``: the real :class:`NeuronLink`, joined by a real :class:`Neuron` agent over an
  in-memory channel (every frame through the codec) with the ``synthetic`` backend;
* ``double``: :class:`neuron_double.NeuronDouble`, which the gateway's and the
  orchestrator's tests use in place of a neuron;
* ``peer``: the federation's :class:`PeerHandle` on cortex A, routing over the in-memory
  mesh to cortex B, which serves with its own orchestrator over its own fleet.

Each harness offers two models: ``fast`` (5 tokens at once) and ``slow`` (1,000 tokens at
10 per second, virtual time), ``running()`` (generations in progress at the far end) and
``kill()`` (the far end dies). The neurons (``link`` and ``double``) also take provisioning
commands (``provisioned(model)``): an unload drains the requests running before it unloads.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helexa.identity import Identity
from helexa.mesh import MemoryMesh, MemoryNetwork, peer_id_from_ed25519
from helexa.protocol import (
    GenerateRequest,
    GenerateResult,
    LoadModel,
    ModelConfig,
    SamplingParams,
    Task,
    TokenChunk,
    UnloadModel,
    UpsertModelConfig,
)
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.dispatch import Target
from helexa.roles.cortex.errors import BadRequest, GatewayError, NoCapacity, NotFound, UpstreamError, to_gateway_error
from helexa.roles.cortex.fleet import RemoteError
from helexa.roles.cortex.federation.ledger import Ledger
from helexa.roles.cortex.federation.service import Federation, FederationSettings
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator
from helexa.roles.cortex.peering import LocalServing, PeerHandle
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import NeuronConfig
from helexa.transport.memory import channel_pair
from neuron_double import NeuronDouble
from serving import cortex_config

TOKEN = "hlx1.conformance"
FAST, SLOW = "fast", "slow"
SYNTHETIC = {FAST: {"tokens": 5}, SLOW: {"tokens": 1000, "tokens_per_second": 10}}


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(60):
        while not predicate():
            await trio.sleep(0.01)


class LinkHarness:
    """A real NeuronLink to a real neuron agent with two synthetic models loaded."""

    async def start(self, nursery: trio.Nursery) -> None:
        self.server = ControlServer(CortexConfig(control_socket="127.0.0.1:0"), Fleet(), lambda: TOKEN)
        self._sides: list = []

        @asynccontextmanager
        async def connect(url):  # noqa: ANN001, ANN202
            cortex_side, neuron_side = channel_pair()
            self._sides.append(neuron_side)
            nursery.start_soon(self.server.handle, cortex_side)
            try:
                yield neuron_side
            finally:
                await neuron_side.aclose()

        config = NeuronConfig(cortex="ws://memory", node_id="n1", join_token=TOKEN, reconnect_initial=3600)
        self.neuron = Neuron(config, connector=connect)
        nursery.start_soon(self.neuron.run)
        await until(lambda: "n1" in self.server.fleet)
        self.link = self.server.fleet.get("n1")
        for i, (model, metadata) in enumerate(SYNTHETIC.items()):
            await self.link.provision(UpsertModelConfig(f"u{i}", ModelConfig(model, "synthetic", metadata=metadata)),
                                      timeout=5)
            assert (await self.link.provision(LoadModel(f"l{i}", model), timeout=5)).ok

    def target(self, model: str) -> Target:
        return self.link

    def provisioned(self, model: str):  # noqa: ANN201
        return self.link

    def running(self) -> int:
        return self.neuron.registry.in_flight

    async def kill(self) -> None:
        await self._sides[-1].aclose()


class DoubleHarness:
    """The neuron double the gateway's tests use."""

    async def start(self, nursery: trio.Nursery) -> None:
        fleet = Fleet()
        self.doubles = {FAST: NeuronDouble("fast-n", fleet, loaded=(FAST,), tokens=5),
                        SLOW: NeuronDouble("slow-n", fleet, loaded=(SLOW,), tokens=1000, token_delay=0.1)}

    def target(self, model: str) -> Target:
        return self.doubles[model]

    def provisioned(self, model: str):  # noqa: ANN201
        return self.doubles[model]

    def running(self) -> int:
        return sum(d.in_flight for d in self.doubles.values())

    async def kill(self) -> None:
        for d in self.doubles.values():
            d.kill()


class PeerHarness:
    """Cortex A's handle on peer cortex B, which serves from its own fleet of doubles."""

    async def start(self, nursery: trio.Nursery) -> None:
        net = MemoryNetwork()
        self.inner = DoubleHarness()
        await self.inner.start(nursery)
        fleet_b = Fleet()
        for d in self.inner.doubles.values():
            fleet_b.add(d)
        catalogue = Catalogue([CatalogueEntry(id=FAST, backend="synthetic"), CatalogueEntry(id=SLOW, backend="synthetic")])
        orch_b = Orchestrator(cortex_config(), fleet_b, catalogue)
        await nursery.start(orch_b.run)
        local = LocalServing(orch_b)
        feds = []
        for name, serving in (("B", local), ("A", None)):
            ident = Identity(Ed25519PrivateKey.generate())
            mesh = MemoryMesh(net, peer_id_from_ed25519(ident.public_bytes), timeout=5)
            await nursery.start(mesh.run)
            fed = Federation(
                mesh=mesh, identity=ident, operator=name, ledger=Ledger(":memory:"),
                offer_fn=(lambda: [OfferedModel(FAST, warm=True), OfferedModel(SLOW, warm=True)]) if serving else list,
                serve_generate=serving.generate if serving else None, serve_embed=serving.embed if serving else None,
                settings=FederationSettings(announce_interval=1.0), clock=trio.current_time)
            await nursery.start(fed.run)
            feds.append(fed)
        self.b, self.a = feds
        await until(lambda: self.a.can_route(FAST) and self.a.can_route(SLOW))
        self.handle = PeerHandle(self.a)

    def target(self, model: str) -> Target:
        return self.handle

    def running(self) -> int:
        return self.inner.running()

    async def kill(self) -> None:
        self.b.mesh.kill()


HARNESSES = {"link": LinkHarness, "double": DoubleHarness, "peer": PeerHarness}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request, nursery, autojump_clock):
    h = HARNESSES[request.param]()
    await h.start(nursery)
    return h


def req(model: str, rid: str = "r1", **sampling) -> GenerateRequest:
    return GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(**sampling))


async def run(target: Target, request: GenerateRequest) -> list[object]:
    async with target.generate(request) as events:
        return [e async for e in events]


# --- the contract --------------------------------------------------------------------------


async def test_a_generation_is_chunks_then_exactly_one_result_whose_usage_counts_them(harness) -> None:
    events = await run(harness.target(FAST), req(FAST))
    *chunks, result = events
    assert chunks and all(isinstance(c, TokenChunk) for c in chunks)
    assert isinstance(result, GenerateResult) and result.finish_reason == "stop"
    assert result.usage.completion_tokens == sum(c.tokens for c in chunks) == 5
    assert result.usage.prompt_tokens > 0
    await until(lambda: harness.running() == 0)


async def test_max_tokens_ends_the_generation_with_length(harness) -> None:
    *chunks, result = await run(harness.target(FAST), req(FAST, max_tokens=2))
    assert result.finish_reason == "length" and result.usage.completion_tokens == 2
    assert sum(c.tokens for c in chunks) == 2


async def test_leaving_early_stops_the_generation_where_it_runs(harness) -> None:
    target = harness.target(SLOW)
    async with target.generate(req(SLOW)) as events:
        async for event in events:
            assert isinstance(event, TokenChunk)
            break
        assert harness.running() == 1
    await until(lambda: harness.running() == 0)
    # and the target serves the next request as if nothing happened
    assert isinstance((await run(harness.target(FAST), req(FAST, "r2")))[-1], GenerateResult)


async def test_concurrent_generations_do_not_mix(harness) -> None:
    results: dict[str, list[object]] = {}

    async def one(rid: str, n: int) -> None:
        results[rid] = await run(harness.target(FAST), req(FAST, rid, max_tokens=n))

    async with trio.open_nursery() as nursery:
        for i in range(1, 5):
            nursery.start_soon(one, f"r{i}", i)
    for i in range(1, 5):
        *chunks, result = results[f"r{i}"]
        assert result.request_id == f"r{i}" and all(c.request_id == f"r{i}" for c in chunks)
        assert result.usage.completion_tokens == i


async def test_a_model_it_does_not_have_is_an_error_a_client_can_read(harness) -> None:
    with pytest.raises(Exception) as info:
        await run(harness.target(FAST), req("absent"))
    error = to_gateway_error(info.value)
    assert isinstance(error, (NotFound, NoCapacity, BadRequest)) and error.message != "internal error"


async def test_the_far_end_dying_mid_stream_ends_it_with_an_upstream_error(harness) -> None:
    with pytest.raises(Exception) as info:
        async with harness.target(SLOW).generate(req(SLOW)) as events:
            async for event in events:
                assert isinstance(event, TokenChunk)
                await harness.kill()
    error = to_gateway_error(info.value)
    assert isinstance(error, GatewayError) and isinstance(error, UpstreamError)


@pytest.fixture(params=["double", "link"])
async def neuron_harness(request, nursery, autojump_clock):
    h = HARNESSES[request.param]()
    await h.start(nursery)
    return h


async def test_an_unload_lets_the_running_generation_finish_and_refuses_new_ones_meanwhile(neuron_harness) -> None:
    h = neuron_harness
    neuron = h.provisioned(SLOW)
    answered: list[float] = []

    async def unload() -> None:
        response = await neuron.provision(UnloadModel("u-slow", SLOW, grace=500.0), timeout=600)
        assert response.ok
        answered.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        async with h.target(SLOW).generate(req(SLOW, max_tokens=50)) as events:
            start = trio.current_time()
            first = await events.__anext__()
            nursery.start_soon(unload)
            await until(lambda: neuron.models[SLOW].state.value == "unloading")
            with pytest.raises(RemoteError) as refused:
                await run(h.target(SLOW), req(SLOW, "r2"))
            assert refused.value.retryable
            rest = [e async for e in events]
        *chunks, result = [first, *rest]
        assert isinstance(result, GenerateResult) and result.usage.completion_tokens == 50
    assert answered and answered[0] >= start + 4.9  # 50 tokens at 10/s: unloaded only once they were out
    assert SLOW not in neuron.models or neuron.models[SLOW].state.value == "configured"
