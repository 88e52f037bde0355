"""The neuron's websocket client (:mod:`helexa.transport.ws_client`) against wsproto's server
(another implementation, for what our own server never does) and against hand-written
servers for what no well-behaved server does: real sockets on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping as WsPing, Pong as WsPong, Request

from helexa.protocol import Ping, Pong, ProtocolError, TokenChunk, decode, encode
from helexa.transport import ChannelClosed, ConnectFailed
from helexa.transport import websocket as ws_transport
from helexa.transport import ws_channel, wsframes, wsupgrade


async def listen(nursery: trio.Nursery, serve_one) -> str:
    """Serve each connection with ``serve_one(stream)``; the ws:// URL."""
    listeners = await nursery.start(trio.serve_tcp, serve_one, 0)
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/control"


def wsproto_server(script):
    """A server on wsproto: accepts the upgrade, then runs ``script(stream, ws, events)``
    where ``events()`` returns the next events read."""

    async def serve_one(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)

        async def events() -> list[object]:
            with trio.fail_after(5):
                while not (out := list(ws.events())):
                    data = await stream.receive_some(65536)
                    ws.receive_data(data or None)
            return out

        (req,) = await events()
        assert isinstance(req, Request) and req.target == "/control"
        await stream.send_all(ws.send(AcceptConnection()))
        await script(stream, ws, events)

    return serve_one


def raw_server(script):
    """A server on our own upgrade code: answers the upgrade, then ``script(stream, conn)``
    with a :class:`wsframes.ServerConnection` holding any bytes read past the head."""

    async def serve_one(stream: trio.SocketStream) -> None:
        buf = b""
        with trio.fail_after(5):
            while (end := wsupgrade.head_end(buf)) < 0:
                buf += await stream.receive_some(65536)
        await stream.send_all(wsupgrade.accept(wsupgrade.parse_upgrade(buf[:end])))
        conn = wsframes.ServerConnection(1 << 20)
        conn.receive_data(buf[end:])
        await script(stream, conn)

    return serve_one


async def test_messages_go_both_ways_with_wsproto_and_its_pings_are_answered(nursery) -> None:
    pongs: list[object] = []

    async def script(stream, ws, events) -> None:
        await stream.send_all(ws.send(WsPing(b"are you there")))
        answered = 0
        while answered < 20 or not pongs:
            for event in await events():
                if isinstance(event, WsPong):
                    pongs.append(event)
                else:
                    await stream.send_all(ws.send(BytesMessage(encode(Pong(decode(event.data).nonce)))))
                    answered += 1

    url = await listen(nursery, wsproto_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        got_in, got = trio.open_memory_channel[object](20)
        async with trio.open_nursery() as reader:
            # The ping is answered by whoever reads: the reader runs before the server pings.

            async def read() -> None:
                for _ in range(20):
                    await got_in.send(await channel.receive())

            reader.start_soon(read)
            for n in range(20):
                await channel.send(Ping(n))
                with trio.fail_after(5):
                    assert await got.receive() == Pong(n)
    assert pongs == [WsPong(b"are you there")]


async def test_frames_sent_from_many_tasks_in_one_tick_arrive_whole_and_in_order(nursery) -> None:
    received: list[object] = []
    done = trio.Event()

    async def script(stream, conn) -> None:
        with trio.fail_after(10):
            while len(received) < 200:
                if (event := conn.next_event()) is None:
                    conn.receive_data(await stream.receive_some(65536))
                else:
                    received.append(decode(event.data))
        done.set()

    url = await listen(nursery, raw_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        async with trio.open_nursery() as senders:
            for n in range(200):  # one large frame among small ones
                text = "x" * 200_000 if n == 7 else str(n)
                senders.start_soon(channel.send, TokenChunk(f"r{n}", text, 1))
                # start_soon order is the order tasks first run in a tick only by chance: the
                # order checked is the order in which each send was called.
        with trio.fail_after(10):
            await done.wait()
    assert sorted(int(m.request_id[1:]) for m in received) == list(range(200))
    assert received[[m.request_id for m in received].index("r7")].text == "x" * 200_000


async def test_sends_keep_their_order_within_a_task_behind_a_full_socket(nursery, autojump_clock) -> None:
    """The server stops reading until the client's socket is full; a sender whose write is
    cut off by its deadline leaves the rest of its frame queued for the next sender (on a
    neuron, a heartbeat within a second), and every frame arrives whole and in order once
    the server reads again."""
    reading = trio.Event()
    received: list[int] = []

    async def script(stream, conn) -> None:
        await reading.wait()
        with trio.fail_after(20):
            while len(received) < 401:
                if (event := conn.next_event()) is None:
                    conn.receive_data(await stream.receive_some(1 << 20))
                elif event.data[:1] != b"\xc0":  # the filler frames are skipped
                    received.append(decode(event.data).nonce)

    url = await listen(nursery, raw_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        big = 64 * 1024
        cancelled = 0
        for n in range(400):
            with trio.move_on_after(0.05) as scope:
                await channel.send(Ping(n))
            cancelled += scope.cancelled_caught
            if n == 200:
                # Fill the socket with frames the server skips, through the same queue,
                # until writes are cut off by their deadline twice (how soon: the kernel's
                # buffers; once alone can be a moment before loopback drains into the
                # server's growing receive buffer, and the pings after would then fit).
                cut = 0
                for _ in range(1000):
                    with trio.move_on_after(0.05) as fill:
                        await channel._write(channel._conn.message(b"\xc0" * big))  # msgpack nil bytes
                    if fill.cancelled_caught:
                        cancelled += 1
                        cut += 1
                        if cut == 2:
                            break
        reading.set()
        with trio.fail_after(20):
            await channel.send(Ping(400))  # writes what the cancelled senders left queued
            while len(received) < 401:
                await trio.sleep(0.01)
    assert cancelled >= 2  # the socket did fill: the filler's write and the pings' after it
    assert received == list(range(401))


async def test_the_servers_close_is_answered_and_ends_receive_with_its_code(nursery) -> None:
    answered: list[object] = []

    async def script(stream, ws, events) -> None:
        await stream.send_all(ws.send(CloseConnection(1001, "going away")))
        answered.extend(await events())

    url = await listen(nursery, wsproto_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        with trio.fail_after(5), pytest.raises(ChannelClosed) as closed:
            await channel.receive()
        assert closed.value.code == 1001
        with pytest.raises(ChannelClosed):
            await channel.send(Ping(1))
    assert [type(e) for e in answered] == [CloseConnection] and answered[0].code == 1001


async def test_leaving_connect_closes_with_1000_and_waits_for_the_answer(nursery) -> None:
    seen: list[int] = []

    async def script(stream, ws, events) -> None:
        (event,) = await events()
        seen.append(event.code)
        await stream.send_all(ws.send(event.response()))

    url = await listen(nursery, wsproto_server(script))
    async with ws_transport.connect(url, timeout=5):
        pass
    assert seen == [1000]


async def test_a_masked_frame_from_the_server_is_a_protocol_error_closed_with_1002(nursery) -> None:
    closes: list[object] = []

    async def script(stream, conn) -> None:
        await stream.send_all(wsframes.client_frame(encode(Pong(1))))  # a server must not mask
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                conn.receive_data(data)
                while (event := conn.next_event()) is not None:
                    closes.append(event)

    url = await listen(nursery, raw_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        with trio.fail_after(5), pytest.raises(ProtocolError):
            await channel.receive()
    assert isinstance(closes[-1], wsframes.CloseReceived) and closes[-1].code == 1002


async def test_a_busy_answer_fails_the_connect_at_once_naming_it(nursery) -> None:
    async def serve_one(stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(wsupgrade.reject(503, retry_after=1))

    url = await listen(nursery, serve_one)
    with trio.fail_after(2), pytest.raises(ConnectFailed, match="503.*Retry-After: 1"):
        async with ws_transport.connect(url, timeout=5):
            pass


async def test_a_server_that_never_answers_fails_the_connect_at_the_deadline(nursery, autojump_clock) -> None:
    async def serve_one(stream) -> None:
        await trio.sleep_forever()

    url = await listen(nursery, serve_one)
    t0 = trio.current_time()
    with pytest.raises(ConnectFailed, match="no handshake within 3s"):
        async with ws_transport.connect(url, timeout=3):
            pass
    assert trio.current_time() - t0 == pytest.approx(3.0)


async def test_a_refused_connection_fails_the_connect() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(ConnectFailed, match="cannot connect"):
        async with ws_transport.connect(f"ws://127.0.0.1:{port}", timeout=5):
            pass


def test_the_client_frames_are_masked_and_read_back_by_the_server_side() -> None:
    server = wsframes.ServerConnection(1 << 20)
    client = wsframes.ClientConnection(1 << 20)
    payload = bytes(range(256)) * 300
    server.receive_data(client.message(payload) + client.ping(b"p"))
    assert server.next_event() == wsframes.Message(payload)
    assert server.next_event() == wsframes.Ping(b"p")
    client.receive_data(server.message(b"back") + server.pong(b"p"))
    assert client.next_event() == wsframes.Message(b"back")
    assert client.next_event() == wsframes.Pong(b"p")
    assert ws_channel.HIGH_WATER > 0


async def test_a_send_timeout_applies_only_once_the_socket_is_full(nursery, autojump_clock) -> None:
    reading = trio.Event()
    sizes: list[int] = []
    last = TokenChunk("r", "", 0)

    async def script(stream, conn) -> None:
        await reading.wait()
        with trio.fail_after(20):
            while not sizes or sizes[-1] != len(encode(last)):
                if (event := conn.next_event()) is None:
                    conn.receive_data(await stream.receive_some(1 << 20))
                else:
                    sizes.append(len(event.data))

    url = await listen(nursery, raw_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        big = TokenChunk("r", "x" * 60_000, 1)
        t0 = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            for _ in range(10_000):  # until the kernel's buffers are full
                await channel.send(big, timeout=2.5)
        assert trio.current_time() - t0 == pytest.approx(2.5)  # sends that did not wait took no time
        reading.set()
        await channel.send(last, timeout=2.5)  # the last frame, after what was left queued
        with trio.fail_after(20):
            while not sizes or sizes[-1] != len(encode(last)):
                await trio.sleep(0.01)
    assert len(set(sizes[:-1])) == 1  # every big frame arrived whole, the one cut off included


async def test_the_run_queue_probe_reads_trios_queue() -> None:
    # ws_channel reads trio's run queue (private) because current_statistics() is
    # O(sockets); this fails loudly if a trio upgrade moves it.
    woken = trio.Event()

    async def sleeper() -> None:
        await woken.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        assert ws_channel._others_runnable()  # the new task is queued to run
        assert trio.lowlevel.current_statistics().tasks_runnable > 0
        woken.set()


async def test_a_receive_cancelled_just_after_its_read_loses_none_of_the_bytes_read(nursery) -> None:
    """The client reads before it waits (a neuron's side): a cancel that lands at the
    schedule point after such a read must leave the bytes for the next receive. Each round
    the server sends half a frame, a canceller cancels the receive in the scheduler tick
    after it read them (before or after the receiving task runs again, in trio's random
    order), then the server sends the rest and the next receive gets the whole message."""
    rounds = 12
    go_on = trio.Semaphore(0)

    async def script(stream, conn) -> None:
        for n in range(rounds):
            frame = wsframes.server_frame(encode(TokenChunk(f"r{n}", "x" * 64, 1)))
            await stream.send_all(frame[:20])
            with trio.fail_after(5):
                await go_on.acquire()
            await stream.send_all(frame[20:])
        await trio.sleep_forever()

    url = await listen(nursery, raw_server(script))
    async with ws_transport.connect(url, timeout=5) as channel:
        for n in range(rounds):
            await trio.sleep(0.02)  # the half frame is in the socket: the eager read finds it
            reading = False
            with trio.CancelScope() as scope:

                async def cancel_after_the_read() -> None:
                    while not reading:
                        await trio.lowlevel.checkpoint()
                    scope.cancel()

                async with trio.open_nursery() as inner:
                    inner.start_soon(cancel_after_the_read)
                    reading = True
                    await channel.receive()
            assert scope.cancelled_caught
            go_on.release()
            with trio.fail_after(5):
                assert await channel.receive() == TokenChunk(f"r{n}", "x" * 64, 1)
