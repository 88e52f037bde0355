"""The serving side's one reader per federation stream, over the in-memory mesh."""

import pytest
import trio

from helexa.mesh import MemoryMesh, MemoryNetwork, StreamClosed, StreamTimeout
from helexa.protocol import Cancel, GenerateRequest, Task
from helexa.protocol.federation import FederatedHello
from helexa.roles.cortex.federation.stream_reader import StreamReader


def request(rid):
    return GenerateRequest(rid, "tiny", Task.CHAT, messages=({"role": "user", "content": "hi"},))


async def pair(nursery):
    """An asking stream and the serving side's end of it."""
    net = MemoryNetwork()
    asker, server = MemoryMesh(net, "asker", timeout=5), MemoryMesh(net, "server", timeout=5)
    accepted = trio.Event()
    ends = []

    async def handler(stream):
        ends.append(stream)
        accepted.set()
        await trio.sleep_forever()

    server.serve("/t/1", handler)
    await nursery.start(asker.run)
    await nursery.start(server.run)
    stream = await asker.open_stream("server", "/t/1")
    await stream.send(FederatedHello("A", "r0"))
    await accepted.wait()
    return asker, stream, ends[0]


async def test_a_cancel_queued_behind_its_request_cancels_the_exchange(nursery, autojump_clock):
    asker, stream, served = await pair(nursery)
    reader = StreamReader(served)
    nursery.start_soon(reader.run)
    assert isinstance(await reader.next(1), FederatedHello)
    await stream.send(FederatedHello("A", "r1"), request("r1"), Cancel("r1"))
    await trio.sleep(0.5)  # the reader has read all three: two queued, the Cancel waiting
    assert isinstance(await reader.next(1), FederatedHello)
    assert (await reader.next(1)).request_id == "r1"
    exchange = reader.begin("r1")
    assert exchange.cancelled and not exchange.asker_gone and exchange.scope.cancel_called


async def test_mid_exchange_a_cancel_stops_it_and_other_frames_are_dropped(nursery, autojump_clock):
    asker, stream, served = await pair(nursery)
    reader = StreamReader(served)
    nursery.start_soon(reader.run)
    await reader.next(1)
    exchange = reader.begin("r1")
    await stream.send(FederatedHello("A", "stray"), Cancel("other"))
    await trio.sleep(0.5)
    assert not exchange.cancelled
    await stream.send(Cancel("r1"))
    await trio.sleep(0.5)
    assert exchange.cancelled and not exchange.asker_gone
    reader.end()
    await stream.send(FederatedHello("A", "r2"))
    assert (await reader.next(1)).request_id == "r2"  # the stray frames were dropped


async def test_the_stream_breaking_stops_the_exchange_as_gone_and_ends_next(nursery, autojump_clock):
    asker, stream, served = await pair(nursery)
    reader = StreamReader(served)
    nursery.start_soon(reader.run)
    await reader.next(1)
    exchange = reader.begin("r1")
    asker.kill()
    await trio.sleep(0.5)
    assert exchange.cancelled and exchange.asker_gone
    reader.end()
    with pytest.raises(StreamClosed):
        await reader.next(1)


async def test_next_times_out_when_nothing_comes(nursery, autojump_clock):
    asker, stream, served = await pair(nursery)
    reader = StreamReader(served)
    nursery.start_soon(reader.run)
    await reader.next(1)
    start = trio.current_time()
    with pytest.raises(StreamTimeout):
        await reader.next(7)
    assert trio.current_time() - start == 7
