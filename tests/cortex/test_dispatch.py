"""The dispatcher on its own: it runs a request on the targets a ``pick`` callable hands it,
with deadlines, failover of unstarted requests and feedback (all on the virtual clock)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio

from helexa.protocol import EmbedRequest, GenerateRequest, GenerateResult, Task, TokenChunk
from helexa.roles.cortex.config import OrchestratorConfig
from helexa.roles.cortex.dispatch import IDLE_SLACK, Dispatcher
from helexa.roles.cortex.errors import NoCapacity, UpstreamTimeout
from helexa.roles.cortex.fleet import Fleet, NeuronGone, RemoteError
from helexa.roles.cortex.metrics import Metrics
from helexa.roles.cortex.scheduler import LiveLoad
from neuron_double import NeuronDouble


def dispatcher(**config) -> Dispatcher:
    return Dispatcher(LiveLoad(), Metrics(), OrchestratorConfig(**config))


def request(rid: str = "r1") -> GenerateRequest:
    return GenerateRequest(rid, "m", Task.CHAT, messages=({"role": "user", "content": "hi"},))


def picker(*targets):
    """Hands out ``targets`` in order, skipping excluded ones; records each call's exclude."""
    calls: list[frozenset[str]] = []

    async def pick(exclude: frozenset[str]):
        calls.append(exclude)
        for t in targets:
            if t.node_id not in exclude:
                return t
        raise NoCapacity("nothing left")

    return pick, calls


async def test_a_generation_streams_and_is_fed_back(autojump_clock) -> None:
    fleet = Fleet()
    n = NeuronDouble("a", fleet, loaded=("m",), tokens=3, token_delay=0.5)
    d = dispatcher()
    pick, calls = picker(n)
    async with d.generate(request(), pick) as gen:
        events = [e async for e in gen]
    assert [type(e) for e in events] == [TokenChunk] * 3 + [GenerateResult]
    assert gen.node_id == "a" and gen.ttft == pytest.approx(0.5) and calls == [frozenset()]
    stats = d.live.nodes["a"]
    assert stats.in_flight == 0 and stats.latency == pytest.approx(0.5) and stats.error_rate == 0


async def test_unstarted_failures_fail_over_until_max_attempts(autojump_clock) -> None:
    fleet = Fleet()
    dead = [NeuronDouble(x, fleet, loaded=("m",)) for x in ("a", "b", "c")]
    for n in dead:
        n.fail_before_start = True
    d = dispatcher(max_attempts=3)
    pick, calls = picker(*dead)
    with pytest.raises(NeuronGone):
        async with d.generate(request(), pick):
            pass
    assert calls == [frozenset(), {"a"}, {"a", "b"}]
    assert all(d.live.nodes[x].error_rate > 0 for x in ("a", "b", "c"))


async def test_a_retryable_refusal_fails_over_and_a_plain_error_does_not(autojump_clock) -> None:
    fleet = Fleet()
    busy = NeuronDouble("a", fleet, loaded=("m",))
    busy.retryable_error = True
    ok = NeuronDouble("b", fleet, loaded=("m",))
    pick, calls = picker(busy, ok)
    async with dispatcher().generate(request(), pick) as gen:
        assert isinstance([e async for e in gen][-1], GenerateResult)
    assert gen.node_id == "b" and calls == [frozenset(), {"a"}]

    class Broken(NeuronDouble):
        def generate(self, request):  # noqa: ANN001, ANN202
            raise RemoteError("internal_error", "boom")

    broken = Broken("x", Fleet(), loaded=("m",))
    pick, calls = picker(broken, ok)
    with pytest.raises(RemoteError):
        async with dispatcher().generate(request(), pick):
            pass
    assert calls == [frozenset()]


async def test_no_first_event_within_the_deadline_is_a_timeout_at_that_time(autojump_clock) -> None:
    fleet = Fleet()
    slow = NeuronDouble("a", fleet, loaded=("m",), tokens=3, token_delay=100)
    pick, _ = picker(slow)
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        async with dispatcher(first_token_timeout=30, max_attempts=1).generate(request(), pick):
            pass
    assert trio.current_time() - start == 30
    assert slow.cancelled == ["r1"]  # the neuron was told to stop


async def test_a_stream_that_stalls_after_it_began_times_out_idle(autojump_clock) -> None:
    fleet = Fleet()
    n = NeuronDouble("a", fleet, loaded=("m",), tokens=5, token_delay=10)
    pick, _ = picker(n)
    got = []
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        async with dispatcher(idle_timeout=4).generate(request(), pick) as gen:
            async for event in gen:
                got.append(event)
    assert len(got) == 1 and trio.current_time() - start == 14  # first token at 10, then 4 s idle


class _StallsAfter:
    """A target streaming a token a second for ``n`` seconds, then silent for ever."""

    node_id = "s"

    def __init__(self, n: int) -> None:
        self.n = n

    @asynccontextmanager
    async def generate(self, request: GenerateRequest):  # noqa: ANN201
        async def events():  # noqa: ANN202
            for i in range(self.n):
                await trio.sleep(1)
                yield TokenChunk(request.request_id, f"t{i} ")
            await trio.sleep_forever()

        yield events()


async def test_a_stream_that_stalls_after_many_events_is_cut_idle_timeout_after_the_last_or_a_little_later(
        autojump_clock) -> None:  # noqa: ANN001
    # The deadline is not moved on every event (IDLE_SLACK): never sooner than idle_timeout
    # after the last event, at most a sixteenth later.
    got = []
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        async with dispatcher(idle_timeout=16).generate(request(), picker(_StallsAfter(20))[0]) as gen:
            async for event in gen:
                got.append(event)
    assert len(got) == 20
    assert 16 <= trio.current_time() - start - 20 <= 16 * (1 + IDLE_SLACK)


async def test_leaving_early_cancels_on_the_target_and_counts_as_no_error(autojump_clock) -> None:
    fleet = Fleet()
    n = NeuronDouble("a", fleet, loaded=("m",), tokens=100, token_delay=1)
    d = dispatcher()
    pick, _ = picker(n)
    async with d.generate(request(), pick) as gen:
        async for _ in gen:
            break
    assert n.cancelled == ["r1"] and n.in_flight == 0
    assert d.live.nodes["a"].in_flight == 0


async def test_embeddings_fail_over_too(autojump_clock) -> None:
    fleet = Fleet()
    dead = NeuronDouble("a", fleet, loaded=("e",))
    dead.kill()
    ok = NeuronDouble("b", fleet, loaded=("e",))
    pick, calls = picker(dead, ok)
    result = await dispatcher().embed(EmbedRequest("e1", "e", ("x",)), pick)
    assert result.dim == 3 and calls == [frozenset(), {"a"}]


async def test_the_first_event_deadline_runs_per_attempt_and_not_while_picking(autojump_clock) -> None:
    fleet = Fleet()
    busy = NeuronDouble("a", fleet, loaded=("m",))
    busy.retryable_error = True
    slow = NeuronDouble("b", fleet, loaded=("m",), tokens=3, token_delay=100)
    pick_fast, _ = picker(busy, slow)

    async def pick(exclude: frozenset[str]):
        await trio.sleep(50)  # a wait for a slot: longer than the first event's deadline
        return await pick_fast(exclude)

    start = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        async with dispatcher(first_token_timeout=30).generate(request(), pick):
            pass
    assert trio.current_time() - start == 50 + 50 + 30  # two picks, then the second attempt's deadline
    assert slow.cancelled == ["r1"]


async def test_an_outer_cancellation_at_the_first_event_deadline_stays_a_cancellation(autojump_clock) -> None:
    fleet = Fleet()
    slow = NeuronDouble("a", fleet, loaded=("m",), tokens=3, token_delay=100)
    pick, _ = picker(slow)
    d = dispatcher(first_token_timeout=30, max_attempts=1)
    with trio.move_on_after(30) as outer:  # the client leaves just as the deadline passes
        async with d.generate(request(), pick):
            pass
    assert outer.cancelled_caught and slow.cancelled == ["r1"]
    assert d.live.nodes["a"].in_flight == 0


async def test_a_whole_answer_leaves_the_attempts_deadlines_at_once(autojump_clock) -> None:
    # A non-streamed answer comes as one result: nothing more is read from the neuron, so
    # the attempt's scope is left at that event (not moved to the idle deadline and kept
    # around the caller's block, which cost a deadline re-filed per request). A block that
    # outlasts idle_timeout after the result is the caller's own time, not a stalled neuron.
    fleet = Fleet()
    n = NeuronDouble("a", fleet, loaded=("m",), tokens=3, token_delay=1)
    n.collect = True
    pick, _ = picker(n)
    async with dispatcher(idle_timeout=4).generate(replace(request(), stream=False), pick) as gen:
        answered = trio.current_time()
        await trio.sleep(10)
        events = [e async for e in gen]
    assert [type(e) for e in events] == [GenerateResult] and gen.result is events[0]
    assert trio.current_time() - answered == 10 and n.cancelled == []
