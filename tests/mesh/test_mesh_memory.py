"""The in-memory mesh: gossip through validators, framed streams, vanishing peers."""

from contextlib import aclosing

import pytest
import trio

from helexa.mesh import DialFailed, MemoryMesh, MemoryNetwork, StreamClosed, StreamTimeout
from helexa.protocol import Cancel, GenerateResult, TokenChunk, Usage
from helexa.protocol import ProtocolError


async def start(nursery, network, *names):
    nodes = [MemoryMesh(network, n, timeout=5) for n in names]
    for node in nodes:
        await nursery.start(node.run)
    return nodes


async def test_gossip_reaches_subscribers_and_the_validator_drops_bad_messages(nursery):
    a, b = await start(nursery, MemoryNetwork(), "a", "b")
    got = []

    async def listen():
        async with aclosing(b.subscribe("t", lambda origin, data: data != b"bad")) as msgs:
            async for m in msgs:
                got.append((m.origin, m.data))

    nursery.start_soon(listen)
    await trio.testing.wait_all_tasks_blocked()
    await a.announce("t", b"bad")
    await a.announce("t", b"good")
    await trio.testing.wait_all_tasks_blocked()
    assert got == [("a", b"good")]


async def test_request_stream_round_trip_through_the_codec(nursery):
    a, b = await start(nursery, MemoryNetwork(), "a", "b")

    async def serve(stream):
        msg = await stream.receive()
        assert stream.remote_peer == "a"
        await stream.send(TokenChunk(msg.request_id, "hi"))
        await stream.send(GenerateResult(msg.request_id, "stop", Usage(1, 1)))

    b.serve("/p", serve)
    s = await a.open_stream("b", "/p")
    await s.send(Cancel("r1"))
    assert await s.receive() == TokenChunk("r1", "hi")
    assert (await s.receive()).finish_reason == "stop"
    with pytest.raises(StreamClosed):
        await s.receive()


async def test_open_stream_to_unknown_peer_or_protocol_fails(nursery):
    a, b = await start(nursery, MemoryNetwork(), "a", "b")
    with pytest.raises(DialFailed):
        await a.open_stream("nobody", "/p")
    with pytest.raises(DialFailed):
        await a.open_stream("b", "/unserved")


async def test_killed_peer_ends_the_stream_with_an_error(nursery):
    a, b = await start(nursery, MemoryNetwork(), "a", "b")

    async def serve(stream):
        await stream.send(TokenChunk("r", "x"))
        await trio.sleep_forever()

    b.serve("/p", serve)
    s = await a.open_stream("b", "/p")
    assert (await s.receive()).text == "x"
    b.kill()
    with pytest.raises(StreamClosed):
        await s.receive()


async def test_receive_has_a_deadline(nursery, autojump_clock):
    a, b = await start(nursery, MemoryNetwork(), "a", "b")
    b.serve("/p", lambda stream: trio.sleep_forever())
    s = await a.open_stream("b", "/p")
    t0 = trio.current_time()
    with pytest.raises(StreamTimeout):
        await s.receive(timeout=3)
    assert trio.current_time() - t0 == pytest.approx(3)


async def test_malformed_frame_raises_protocol_error_and_a_raising_handler_only_resets(nursery):
    a, b = await start(nursery, MemoryNetwork(), "a", "b")

    async def bad(stream):
        await stream._write_raw(b"\x03abc")  # a frame that is not msgpack
        raise RuntimeError("handler bug")

    b.serve("/p", bad)
    s = await a.open_stream("b", "/p")
    with pytest.raises(ProtocolError):
        await s.receive()
    assert b.peers() == ["a"]  # the node survived its handler's exception
