"""Cache-aware routing through the orchestrator over two neuron doubles: a conversation goes
back to the neuron that holds its prefix unless that neuron is too busy; session affinity."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from helexa.protocol import GenerateRequest, Task
from helexa.roles.cortex.cache_scope import scope_of
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator
from neuron_double import NeuronDouble
from serving import cortex_config

CATALOGUE = Catalogue([CatalogueEntry(id="m", backend="synthetic", memory_mb=100)])
ANSWER = "t0 t1 t2 "  # what a double answers


@asynccontextmanager
async def orchestrating(**orchestrator):
    fleet = Fleet()
    doubles = [NeuronDouble(n, fleet, loaded=("m",), tokens=3, token_delay=0.1) for n in ("n1", "n2")]
    orchestrator.setdefault("prefix_block_chars", 32)
    orch = Orchestrator(cortex_config(orchestrator=orchestrator), fleet, CATALOGUE)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        yield orch, doubles
        nursery.cancel_scope.cancel()


def conversation(topic: str, turns: int) -> GenerateRequest:
    messages: list[dict] = []
    for i in range(turns):
        if i:
            messages.append({"role": "assistant", "content": ANSWER})
        messages.append({"role": "user", "content": f"Tell me more about {topic}, part {i}, in some detail."})
    return GenerateRequest(f"{topic}-{turns}", "m", Task.CHAT, messages=tuple(messages))


async def ask(orch: Orchestrator, request: GenerateRequest, **kw):  # noqa: ANN201
    async with orch.generate(request, **kw) as gen:
        async for _ in gen:
            pass
    return gen.node_id, gen.decision


async def hold(orch: Orchestrator, node_id: str, busy: trio.Event, release: trio.Event) -> None:
    """Keep one long request running on ``node_id`` (by session) until ``release``."""
    async with orch.generate(GenerateRequest("hold", "m", Task.CHAT, messages=({"role": "user", "content": "x"},)),
                             session="holder") as gen:
        assert gen.node_id == node_id
        busy.set()
        await release.wait()


async def test_without_load_pressure_each_conversation_returns_to_its_neuron(autojump_clock) -> None:
    async with orchestrating() as (orch, _):
        assert (await ask(orch, conversation("rivers", 1)))[0] == "n1"  # both idle: the first by name
        busy, release = trio.Event(), trio.Event()
        orch.prefix.record("n1", "m", (), session="holder")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, orch, "n1", busy, release)
            await busy.wait()
            assert (await ask(orch, conversation("mountains", 1)))[0] == "n2"  # n1 busier, no cache: least busy
            node, decision = await ask(orch, conversation("rivers", 2))
            assert node == "n1" and decision.cache == "hit"  # busier by one, within the bound: its cache wins
            assert (decision.matched, decision.blocks) == (2, 4)  # turn one and its answer: 78 of 136 chars
            node, decision = await ask(orch, conversation("mountains", 2))
            assert node == "n2" and decision.cache == "hit"
            release.set()


async def test_under_load_pressure_a_conversation_moves_to_the_least_busy_neuron(autojump_clock) -> None:
    async with orchestrating(cache_max_skew=0) as (orch, _):
        assert (await ask(orch, conversation("rivers", 1)))[0] == "n1"
        busy, release = trio.Event(), trio.Event()
        orch.prefix.record("n1", "m", (), session="holder")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, orch, "n1", busy, release)
            await busy.wait()
            node, decision = await ask(orch, conversation("rivers", 2))
            assert node == "n2" and decision.cache == "miss"
            release.set()
        text = orch.metrics.render().decode()
    assert 'helexa_routing_decisions_total{cache="miss",mode="local",model="m"}' in text
    assert 'helexa_prefix_blocks_total{kind="miss",model="m"}' in text


async def test_a_session_goes_back_where_it_went_whatever_its_prompt(autojump_clock) -> None:
    async with orchestrating() as (orch, _):
        orch.live.begin("n1", "m", 0.0)  # n1 busier: a new session starts on n2
        first, _ = await ask(orch, conversation("a", 1), session="s1")
        orch.live.end("n1", "m", 0.0, latency=None, ok=True)
        orch.live.begin("n2", "m", 0.0)  # now n2 is busier, by one
        again, decision = await ask(orch, conversation("b", 1), session="s1")
    assert first == again == "n2" and decision.cache == "session"


async def test_least_busy_routing_ignores_caches(autojump_clock) -> None:
    async with orchestrating(routing="least_busy") as (orch, _):
        await ask(orch, conversation("rivers", 1))
        orch.live.begin("n1", "m", 0.0)
        node, decision = await ask(orch, conversation("rivers", 2))
    assert node == "n2" and decision.cache == "none" and orch.prefix.held() == {}


async def test_a_neuron_that_leaves_or_unloads_takes_its_prefixes_along(autojump_clock) -> None:
    async with orchestrating() as (orch, doubles):
        await ask(orch, conversation("rivers", 1))
        assert ("n1", "m") in orch.prefix.held()
        await orch.unload("n1", "m")
        assert ("n1", "m") not in orch.prefix.held()
        await ask(orch, conversation("lakes", 1))
        assert ("n2", "m") in orch.prefix.held()
        doubles[1].kill()
        orch.fleet.remove(doubles[1])
        await trio.sleep(0.1)
        assert orch.prefix.held() == {}


def session_node(prefix, session: str) -> str | None:  # noqa: ANN001
    """Where the open default portal's ``session`` went: a session is its cache scope's own."""
    return prefix.session_node("m", f"{scope_of('default')}:{session}")


async def test_a_conversation_of_another_cache_scope_neither_follows_nor_reveals_its_prefix(autojump_clock) -> None:
    from dataclasses import replace

    async with orchestrating() as (orch, _):
        busy, release = trio.Event(), trio.Event()
        orch.prefix.record("n2", "m", (), session="holder")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, orch, "n2", busy, release)
            await busy.wait()
            first = replace(conversation("rivers", 1), cache_scope="b" * 32)
            assert (await ask(orch, first, session="s"))[0] == "n1"  # the idle one
            mine = replace(conversation("rivers", 2), cache_scope="b" * 32)
            theirs = replace(conversation("rivers", 2), cache_scope="a" * 32)
            node, decision = await ask(orch, theirs)
            assert decision.cache != "hit" and decision.matched == 0  # b's prefix is not a's
            node, decision = await ask(orch, mine)
            assert node == "n1" and decision.cache == "hit"
            release.set()
    assert orch.prefix.session_node("m", "s") is None  # a session id is its scope's own
    assert orch.prefix.session_node("m", f"{'b' * 32}:s") == "n1"


async def test_the_gateway_passes_the_session_header_or_the_user_field() -> None:
    import openai

    from serving import serving

    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",))
    async with serving(fleet, CATALOGUE) as (gateway, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)

        def ask() -> None:
            messages = [{"role": "user", "content": "hi"}]
            client.chat.completions.create(model="m", messages=messages, extra_headers={"x-session-id": "s1"})
            list(client.chat.completions.create(model="m", messages=messages, user="alice", stream=True))

        await trio.to_thread.run_sync(ask)
        prefix = gateway.orchestrator.prefix
    assert session_node(prefix, "s1") == "n1" and session_node(prefix, "user:alice") == "n1"


async def test_the_responses_ollama_and_anthropic_surfaces_pass_the_session_too() -> None:
    import httpx

    from serving import serving

    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("m",))
    async with serving(fleet, CATALOGUE) as (gateway, url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r1 = await http.post("/v1/responses", json={"model": "m", "input": "hi", "user": "bob"})
            r2 = await http.post("/api/chat", headers={"x-session-id": "s2"},
                                 json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False})
            r3 = await http.post("/v1/messages", headers={"x-session-id": "s3"},
                                 json={"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        prefix = gateway.orchestrator.prefix
    assert r1.status_code == r2.status_code == r3.status_code == 200
    assert session_node(prefix, "user:bob") == "n1" and session_node(prefix, "s2") == "n1"
    assert session_node(prefix, "s3") == "n1"
