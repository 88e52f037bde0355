"""The disconnect watch: unit tests on trio's autojump clock, then the gateway over a socket.

In the unit tests ``receive`` is the one an ASGI server hands a request after its body:
it blocks until the client leaves or the response has ended, then says
``http.disconnect``. It is built here on a trio Event so the tests choose the moment.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.disconnect_watch import DisconnectWatch
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from serving import build

GRACE = 1.0


class Receive:
    """``receive()`` after the body: ``http.disconnect`` once :meth:`disconnect` is called."""

    def __init__(self) -> None:
        self.gone = trio.Event()
        self.calls: list[float] = []

    def disconnect(self) -> None:
        self.gone.set()

    async def __call__(self) -> dict[str, str]:
        self.calls.append(trio.current_time())
        await self.gone.wait()
        return {"type": "http.disconnect"}


@asynccontextmanager
async def watching() -> AsyncIterator[tuple[DisconnectWatch, trio.Nursery]]:
    watch = DisconnectWatch(grace=GRACE)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        yield watch, nursery
        nursery.cancel_scope.cancel()


async def request(watch: DisconnectWatch, receive, duration: float) -> trio.CancelScope:
    """A request handler: runs ``duration`` seconds under the watch, unless cancelled."""
    with trio.CancelScope() as scope:
        watched = watch.add(receive, scope)
        try:
            await trio.sleep(duration)
        finally:
            watch.discard(watched)
    return scope


async def test_a_request_finishing_within_grace_never_gets_a_watcher(autojump_clock) -> None:
    receive = Receive()
    async with watching() as (watch, _):
        scope = await request(watch, receive, GRACE / 2)
        await trio.sleep(10 * GRACE)
    assert receive.calls == [] and not scope.cancel_called


async def test_a_long_request_is_cancelled_when_its_client_disconnects(autojump_clock) -> None:
    receive = Receive()
    async with watching() as (watch, nursery):
        t0 = trio.current_time()

        async def leave_at_5s() -> None:
            await trio.sleep(5)
            receive.disconnect()

        nursery.start_soon(leave_at_5s)
        scope = await request(watch, receive, 100)
        ended = trio.current_time() - t0
    assert scope.cancelled_caught and ended == 5
    assert [t - t0 for t in receive.calls] == [GRACE]  # one watcher, started after the grace


async def test_a_client_that_left_during_the_grace_is_noticed_when_the_watcher_starts(autojump_clock) -> None:
    receive = Receive()
    receive.disconnect()
    async with watching() as (watch, _):
        t0 = trio.current_time()
        scope = await request(watch, receive, 100)
        ended = trio.current_time() - t0
    assert scope.cancelled_caught and ended == GRACE


async def test_a_long_request_that_finishes_normally_is_not_cancelled(autojump_clock) -> None:
    receive = Receive()
    async with watching() as (watch, _):
        scope = await request(watch, receive, 5)
        receive.disconnect()  # the server reports http.disconnect once the response has ended
        await trio.sleep(GRACE)
    assert len(receive.calls) == 1 and not scope.cancel_called


async def test_a_request_starting_between_sweeps_is_watched_within_two_graces(autojump_clock) -> None:
    first, second = Receive(), Receive()
    async with watching() as (watch, nursery):
        t0 = trio.current_time()
        nursery.start_soon(request, watch, first, 100)
        await trio.sleep(0.3 * GRACE)
        nursery.start_soon(request, watch, second, 100)
        await trio.sleep(3 * GRACE)
        first.disconnect()
        second.disconnect()
    assert [t - t0 for t in first.calls] == [GRACE]
    assert [t - t0 for t in second.calls] == [2 * GRACE]


async def test_registering_wakes_no_task_and_a_lone_request_is_watched_one_grace_after_it_started(
        autojump_clock) -> None:
    # A request's registration only sets the sweeper's deadline: a task made runnable here
    # would run before the request's frame is written to its neuron (the websocket's write
    # yields to runnable tasks).
    receive = Receive()
    async with watching() as (watch, nursery):
        await trio.sleep(7.25 * GRACE)  # idle, long after any sweep
        t0 = trio.current_time()
        with trio.CancelScope() as scope:
            watched = watch.add(receive, scope)
            assert trio.lowlevel.current_statistics().tasks_runnable == 0
            try:
                await trio.sleep(4 * GRACE)
            finally:
                watch.discard(watched)
        receive.disconnect()
    assert [t - t0 for t in receive.calls] == [GRACE]


async def test_a_receive_that_fails_ends_its_watcher_without_cancelling(autojump_clock) -> None:
    async def failing() -> dict[str, str]:
        raise RuntimeError("receive() after the response")

    later = Receive()
    later.disconnect()
    async with watching() as (watch, _):
        survived = await request(watch, failing, 3 * GRACE)
        cancelled = await request(watch, later, 100)  # the sweeper is still at work
    assert not survived.cancel_called and cancelled.cancelled_caught


# --- through the gateway ------------------------------------------------------------------


@pytest.mark.parametrize("server", ["helexa", "hypercorn"])
async def test_a_non_streaming_request_whose_client_left_is_cancelled_on_the_neuron(server: str, autojump_clock) -> None:
    # Nothing is written to the client until a non-streaming generation ends, so only the
    # watch can notice that it left.
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=1000, token_delay=0.01)
    generating, ended = trio.Event(), trio.Event()
    generate = neuron.generate

    @asynccontextmanager
    async def observed(request):  # noqa: ANN001, ANN202
        generating.set()
        try:
            async with generate(request) as events:
                yield events
        finally:
            ended.set()

    neuron.generate = observed
    gateway = build(fleet, Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)]),
                    gateway={"server": server}, gateway_args={"inline_ledger": True})
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x"}]})
    with trio.fail_after(100):  # virtual seconds; the generation alone would take 10
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.orchestrator.run)
            url = (await nursery.start(gateway.run))[0]
            stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
            await stream.send_all(f"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                                  f"content-type: application/json"
                                  f"\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
            await generating.wait()
            started_at = trio.current_time()
            await stream.aclose()
            await ended.wait()
            took = trio.current_time() - started_at
            nursery.cancel_scope.cancel()
    assert neuron.cancelled == neuron.generations and neuron.in_flight == 0 and not neuron.finished
    assert took == DisconnectWatch().grace  # the watch starts after its grace, and sees the close at once
    assert gateway.in_flight.count == 0
