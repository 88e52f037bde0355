"""A connection that has not proved the join token may send only small frames: a stranger
sending one of ``max_frame_bytes`` (16 MiB) on each of ``max_pending_handshakes``
connections could make the cortex hold gigabytes before any authentication. Real
websockets on 127.0.0.1 against a real ControlServer."""

from __future__ import annotations

import base64
import os
import struct

import trio

from helexa.protocol import Heartbeat, ModelState, ModelStatus, ModelStatusChanged, NeuronMetrics
from helexa.protocol.join import NeuronJoin, Welcomed
from helexa.roles.cortex.control_server import HANDSHAKE_MAX_FRAME
from helexa.transport.handshake import exchange
from helexa.transport.websocket import connect
from test_control_server import descriptor, start_cortex, wait_until, TOKEN


async def upgraded(port: int) -> tuple[trio.SocketStream, bytes]:
    """A raw websocket to the cortex, upgraded; the bytes read past the upgrade's head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101")
    return stream, head


async def test_a_big_frame_before_the_join_is_refused_unread(nursery) -> None:
    server, url = await start_cortex(nursery)  # max_frame_bytes: the default 16 MiB
    port = int(url.rsplit(":", 1)[1])
    stream, head = await upgraded(port)
    # A binary frame that says it holds 8 MiB (under max_frame_bytes), masked with zeros:
    # only its first KiB is sent, and the cortex answers at once.
    await stream.send_all(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 8 << 20) + b"\0" * 4 + b"\0" * 1024)
    data = head.split(b"\r\n\r\n", 1)[1]

    async def at_least(n: int) -> None:
        nonlocal data
        while len(data) < n:
            data += await stream.receive_some(4096)

    with trio.fail_after(5):
        while True:  # the server's frames (unmasked, small) up to its Close
            await at_least(2)
            size, at = data[1] & 0x7F, 2
            if size == 126:
                await at_least(4)
                size, at = struct.unpack(">H", data[2:4])[0], 4
            await at_least(at + size)
            if data[0] & 0x0F == 0x8:
                break
            data = data[at + size:]
    assert struct.unpack(">H", data[at:at + 2])[0] == 1009  # a Close for a message too big
    await stream.aclose()


async def test_a_joined_neuron_may_send_frames_up_to_max_frame_bytes(nursery) -> None:
    server, url = await start_cortex(nursery)
    async with connect(url) as channel:
        session = NeuronJoin(TOKEN, descriptor("big"), timeout=10)
        assert await exchange(channel, session, session.start()) == []
        assert isinstance(session.verdict, Welcomed)
        await wait_until(lambda: "big" in server.fleet)
        link = server.fleet.get("big")
        error = "e" * (2 * HANDSHAKE_MAX_FRAME)
        await channel.send(ModelStatusChanged(ModelStatus("m", ModelState.FAILED, error=error)))
        await channel.send(Heartbeat(1, NeuronMetrics()))
        await wait_until(lambda: link.heartbeats >= 1, timeout=10)
        assert link.connected


async def test_strangers_frames_held_all_together_stay_under_max_handshake_bytes(nursery) -> None:
    limit = 2 << 20
    server, url = await start_cortex(nursery, max_handshake_bytes=limit)
    port = int(url.rsplit(":", 1)[1])
    streams = []
    for _ in range(4):  # each sends 900 KiB of a frame that says it holds 1000 KiB (under the 1 MiB limit)
        stream, _ = await upgraded(port)
        streams.append(stream)
        try:
            await stream.send_all(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 1000 << 10) + b"\0" * 4)
            for _ in range(9):
                await stream.send_all(b"\0" * (100 << 10))
        except trio.BrokenResourceError:
            pass  # closed by the cortex part way (and reset: its Close may be lost)
    await wait_until(lambda: server.read_budget.refused >= 1)
    assert server.read_budget.used <= limit  # a gigabyte's worth with 1024 of them, before the bound
    closes = []
    for stream in streams:
        with trio.move_on_after(1):
            data = b""
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk
            except trio.BrokenResourceError:
                pass
            if data[:1] == b"\x88":
                closes.append(struct.unpack(">H", data[2:4])[0])
    assert set(closes) <= {1013}  # try again later (the neuron redials on its backoff)
    for stream in streams:
        await stream.aclose()
    await wait_until(lambda: server.read_budget.used == 0)  # given back as they end
    # A neuron joins as before, and what it read before its join is given back.
    async with connect(url) as channel:
        session = NeuronJoin(TOKEN, descriptor("after"), timeout=10)
        assert await exchange(channel, session, session.start()) == []
        assert isinstance(session.verdict, Welcomed)
        await wait_until(lambda: "after" in server.fleet)
        assert server.read_budget.used == 0
