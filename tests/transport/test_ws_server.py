"""The control plane's websocket server (:mod:`helexa.transport.ws_server`) against
trio-websocket's client, the one real neurons dial with: real sockets on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio
import trio_websocket

from helexa.protocol import Fault, Ping, Pong, decode, encode
from helexa.transport import ChannelClosed
from helexa.transport import websocket as ws_transport
from helexa.transport.admission import PendingHandshakes
from helexa.transport.ws_server import ServerChannel


async def start(nursery: trio.Nursery, handler, **kw) -> str:
    port = await nursery.start(lambda task_status: ws_transport.serve(handler, "127.0.0.1", 0,
                                                                      task_status=task_status, **kw))
    return f"ws://127.0.0.1:{port}"


async def echo(channel: ServerChannel) -> None:
    while True:
        msg = await channel.receive()
        if isinstance(msg, Ping):
            await channel.send(Pong(msg.nonce))


async def test_messages_go_both_ways_with_the_neurons_client(nursery) -> None:
    url = await start(nursery, echo)
    async with ws_transport.connect(url, timeout=5) as channel:
        for n in range(50):
            await channel.send(Ping(n))
            assert await channel.receive() == Pong(n)


async def test_fragments_and_websocket_pings_from_the_client_are_handled(nursery) -> None:
    # wsproto's client (the one inside trio-websocket) over a plain socket, to send what
    # trio-websocket's API does not: one message in two fragments with a ping between them.
    from wsproto import WSConnection
    from wsproto.connection import ConnectionType
    from wsproto.events import AcceptConnection, BytesMessage, Pong as WsPong, Request
    from wsproto.events import Ping as WsPing

    url = await start(nursery, echo)
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    ws = WSConnection(ConnectionType.CLIENT)

    async def events() -> list[object]:
        with trio.fail_after(5):
            while not (out := list(ws.events())):
                ws.receive_data(await stream.receive_some(65536))
        return out

    await stream.send_all(ws.send(Request(host="cortex", target="/")))
    assert [type(e) for e in await events()] == [AcceptConnection]
    body = encode(Ping(7))
    await stream.send_all(ws.send(BytesMessage(body[:3], message_finished=False)) + ws.send(WsPing(b"hi"))
                          + ws.send(BytesMessage(body[3:])))
    got = await events()
    if len(got) == 1:
        got += await events()
    assert got[0] == WsPong(b"hi")
    assert isinstance(got[1], BytesMessage) and decode(got[1].data) == Pong(7)
    await stream.aclose()


async def test_a_client_close_is_answered_with_its_code_and_ends_the_handler(nursery) -> None:
    ended = trio.Event()
    seen: list[int | None] = []

    async def handler(channel: ServerChannel) -> None:
        try:
            await channel.receive()
        except ChannelClosed as exc:
            seen.append(exc.code)
            ended.set()

    url = await start(nursery, handler)
    async with trio_websocket.open_websocket_url(url) as ws:
        with trio.fail_after(5):
            await ws.aclose(1001, "going away")  # waits for the server's answering close
        assert ws.closed.code == 1001
    with trio.fail_after(5):
        await ended.wait()
    assert seen == [1001]


async def test_a_server_close_reaches_the_client_with_its_code_and_reason(nursery) -> None:
    async def handler(channel: ServerChannel) -> None:
        await channel.aclose(1008, "unauthorized")

    url = await start(nursery, handler)
    async with trio_websocket.open_websocket_url(url) as ws:
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    assert (closed.value.reason.code, closed.value.reason.reason) == (1008, "unauthorized")


async def test_closing_while_another_task_reads_ends_the_reader(nursery) -> None:
    reader_saw: list[str] = []

    async def handler(channel: ServerChannel) -> None:
        async def read() -> None:
            try:
                await channel.receive()
            except ChannelClosed:
                reader_saw.append("closed")

        async with trio.open_nursery() as inner:
            inner.start_soon(read)
            await trio.sleep(0.05)
            await channel.aclose(1001, "cortex stopping")

    url = await start(nursery, handler)
    async with trio_websocket.open_websocket_url(url) as ws:
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason.code == 1001
    with trio.fail_after(5):
        while not reader_saw:
            await trio.sleep(0.01)
    assert reader_saw == ["closed"]


@pytest.mark.parametrize(("frame", "code"), [(b"x" * 2000, 1009), ("text", 1002), (b"\xc1", 1002)],
                         ids=["oversized", "text", "not-msgpack"])
async def test_a_bad_message_gets_a_fault_and_a_close_and_only_its_connection_ends(nursery, frame, code) -> None:
    url = await start(nursery, echo, max_frame=1000)
    async with ws_transport.connect(url, timeout=5) as bystander:
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(frame)
            with trio.fail_after(5):
                assert isinstance(decode(await ws.get_message()), Fault)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason.code == code
        await bystander.send(Ping(1))
        assert await bystander.receive() == Pong(1)


async def test_an_unmasked_frame_closes_its_connection_with_1002(nursery) -> None:
    url = await start(nursery, echo)
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws._stream.send_all(b"\x82\x03abc")  # a client frame must be masked
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason.code == 1002


async def test_a_plain_http_request_gets_a_400_and_the_server_carries_on(nursery) -> None:
    url = await start(nursery, echo)
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    async with ws_transport.connect(url, timeout=5) as channel:
        await channel.send(Ping(2))
        assert await channel.receive() == Pong(2)


async def test_past_the_pending_cap_a_dial_fails_at_once_with_503(nursery) -> None:
    pending = PendingHandshakes(1, stale_after=10)
    url = await start(nursery, echo, pending=pending)
    port = int(url.rsplit(":", 1)[1])
    holder = await trio.open_tcp_stream("127.0.0.1", port)  # takes the only slot
    await trio.sleep(0.05)
    with trio.fail_after(2), pytest.raises(trio_websocket.HandshakeError) as refused:
        async with trio_websocket.open_websocket_url(url, connect_timeout=5):
            pass
    assert "503" in str(refused.value) or getattr(refused.value, "status_code", None) == 503
    await holder.aclose()
