"""The direct channel between real libp2p hosts on 127.0.0.1, real sockets, in one trio
process: federated requests over it, attacks on its listener, fallback to libp2p."""

import os
import socket
from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helexa.identity import Identity
from helexa.mesh import DialFailed, MeshSettings, StreamClosed, StreamTimeout
from helexa.mesh.direct_channel import DirectChannel, DirectStream
from helexa.mesh.direct_session import NONCE_SIZE, DirectSession, encode_hello
from helexa.mesh.direct_tickets import Grant
from helexa.mesh.libp2p_mesh import Libp2pMesh
from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk, Usage
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation.ledger import Ledger
from helexa.roles.cortex.federation.service import Federation, FederationSettings

pytestmark = pytest.mark.slow

ECHO = "/helexa/test-echo/1"
ON, OFF = MeshSettings(), MeshSettings(direct=False)


async def echo(stream):
    while True:
        msg = await stream.receive(timeout=20)
        await stream.send(TokenChunk(stream.remote_peer, msg.text), timeout=20)


async def meshes(nursery, *settings):
    """Running meshes, each serving ``ECHO``, the first connected to the others."""
    nodes = [Libp2pMesh(os.urandom(32), s) for s in settings]
    addrs = []
    for node in nodes:
        node.serve(ECHO, echo)
        addrs.append(await nursery.start(node.run))
    for a in addrs[1:]:
        await nodes[0].connect(a[0], timeout=10)
    return nodes


async def exchange(stream, text="hi"):
    await stream.send(TokenChunk("r", text), timeout=10)
    return await stream.receive(timeout=10)


async def closed_by_listener(sock):
    """Whether the listener closed ``sock`` (end of stream or reset) within 5 s."""
    with trio.fail_after(5):
        try:
            while await sock.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
    return True


async def handshake(port, grant, *, nonce=None, protocol=ECHO, tamper=False):
    """Dial by hand: ``(socket, session, the listener's answer or b"" if it closed)``."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    nonce = nonce or os.urandom(NONCE_SIZE)
    await sock.send_all(encode_hello(grant.ticket_id, nonce))
    their = b""
    while len(their) < NONCE_SIZE:
        data = await sock.receive_some(NONCE_SIZE - len(their))
        if not data:
            return sock, None, b""
        their += data
    session = DirectSession(grant.secret, grant.ticket_id, nonce, their, dialer=True)
    record = bytearray(session.seal(protocol.encode()))
    if tamper:
        record[-3] ^= 0x10
    await sock.send_all(bytes(record))
    data = await sock.receive_some(4096)
    if not data:
        return sock, session, b""
    session.feed(data)
    return sock, session, session.next_record()


# --- streams ------------------------------------------------------------------------------


async def test_a_stream_goes_over_the_direct_channel_bound_to_the_peer_its_ticket_names(nursery):
    b, a, c = await meshes(nursery, ON, ON, ON)  # b is connected to a and c
    await a.connect(b.listen_addrs[0], timeout=10)
    await c.connect(b.listen_addrs[0], timeout=10)
    from_a = await a.open_stream(b.peer_id, ECHO)
    from_c = await c.open_stream(b.peer_id, ECHO)
    assert isinstance(from_a, DirectStream) and isinstance(from_c, DirectStream)
    # The listener's handler sees each dialer as the peer libp2p authenticated.
    assert (await exchange(from_a)).request_id == a.peer_id
    assert (await exchange(from_c)).request_id == c.peer_id
    for _ in range(5):
        assert (await exchange(from_a, "again")).text == "again"
    assert a.direct.stats.opened == 1 and c.direct.stats.opened == 1 and b.direct.stats.accepted == 2
    assert a.direct.stats.fallbacks == 0 and b.direct.stats.refused == 0
    await from_a.aclose()
    with pytest.raises(StreamClosed):
        await from_a.send(TokenChunk("r", "x"))


async def test_a_protocol_the_peer_does_not_serve_is_a_dial_failure_not_a_fallback(nursery):
    a, b = await meshes(nursery, ON, ON)
    with pytest.raises(DialFailed):
        await a.open_stream(b.peer_id, "/helexa/nobody-serves-this/1")
    assert a.direct.stats.fallbacks == 0
    assert isinstance(await a.open_stream(b.peer_id, ECHO), DirectStream)


async def test_megabytes_cross_both_ways_on_one_direct_stream():
    count, size = 200, 40_000
    received = []

    async def bulk(stream):
        for _ in range(count):
            msg = await stream.receive(timeout=20)
            received.append(len(msg.text))
            await stream.send(TokenChunk("r", "ok" * 1000), timeout=20)

    async with trio.open_nursery() as nursery:
        a, b = await meshes(nursery, ON, ON)
        b.serve("/helexa/test-bulk/1", bulk)
        stream = await a.open_stream(b.peer_id, "/helexa/test-bulk/1", timeout=10)
        assert isinstance(stream, DirectStream)

        async def send_all():
            for _ in range(count):
                await stream.send(TokenChunk("r", "x" * size), timeout=20)

        async with trio.open_nursery() as inner:
            inner.start_soon(send_all)
            answers = [await stream.receive(timeout=20) for _ in range(count)]
        assert received == [size] * count and len(answers) == count
        nursery.cancel_scope.cancel()


async def test_frames_that_came_in_one_write_are_taken_without_waiting(nursery):
    async def two(stream):
        msg = await stream.receive(timeout=20)
        await stream.send(TokenChunk("r", msg.text), TokenChunk("r", "second"), timeout=20)
        await trio.sleep_forever()

    a, b = await meshes(nursery, ON, ON)
    b.serve("/helexa/test-two/1", two)
    stream = await a.open_stream(b.peer_id, "/helexa/test-two/1", timeout=10)
    with pytest.raises(trio.WouldBlock):
        stream.receive_nowait()
    assert (await exchange(stream, "first")).text == "first"
    assert stream.receive_nowait().text == "second"
    with pytest.raises(trio.WouldBlock):
        stream.receive_nowait()


async def test_a_send_to_a_peer_that_stops_reading_times_out_and_breaks_only_its_stream(nursery):
    # The send's deadline starts once the socket is full (the common send opens no scope):
    # a peer that reads nothing makes it time out; that stream is reset, not the others.
    async def deaf(stream):
        await trio.sleep_forever()

    a, b = await meshes(nursery, ON, ON)
    b.serve("/helexa/test-deaf/1", deaf)
    stream = await a.open_stream(b.peer_id, "/helexa/test-deaf/1", timeout=10)
    assert isinstance(stream, DirectStream)
    with pytest.raises(StreamTimeout):
        for _ in range(10_000):  # ~600 MB at most: loopback's buffers hold a few MB
            await stream.send(TokenChunk("r", "x" * 60_000), timeout=0.5)
    with pytest.raises(StreamClosed):
        await stream.send(TokenChunk("r", "after"), timeout=5)
    assert (await exchange(await a.open_stream(b.peer_id, ECHO))).text == "hi"


async def test_a_silent_peers_direct_streams_are_reset_at_once(nursery):
    a, b = await meshes(nursery, ON, ON)
    stream = await a.open_stream(b.peer_id, ECHO)
    await exchange(stream)
    assert a.direct.live(b.peer_id) == 1 and b.direct.live(a.peer_id) == 1
    waiting = trio.Event()
    ended = []

    async def wait_for_a_frame():
        waiting.set()
        try:
            await stream.receive(timeout=60)
        except StreamClosed:
            ended.append(trio.current_time())

    async with trio.open_nursery() as inner:
        inner.start_soon(wait_for_a_frame)
        await waiting.wait()
        # What the liveness probe does to a peer that stops answering pings.
        started = trio.current_time()
        await a.direct.abort_peer(b.peer_id)
    assert ended and ended[0] - started < 1
    assert a.direct.live(b.peer_id) == 0
    with trio.fail_after(5):
        while b.direct.live(a.peer_id):  # b's handler saw the connection go
            await trio.sleep(0.01)


# --- the listener under attack ------------------------------------------------------------


async def test_bad_connections_are_closed_and_only_they(nursery):
    a, b = await meshes(nursery, ON, ON)
    grant = Grant.decode((await a._ask_ticket(b.peer_id))[1])
    port = grant.port

    # An unknown ticket: closed before the listener says anything.
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(encode_hello(os.urandom(16), os.urandom(NONCE_SIZE)))
    assert await closed_by_listener(sock)
    # Not a hello at all.
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 40)
    assert await closed_by_listener(sock)
    # The right ticket id without its secret (a peer that saw the id on the wire).
    thief = Grant(grant.port, grant.ttl, grant.max_uses, grant.ticket_id, os.urandom(32))
    sock, _, answer = await handshake(port, thief)
    assert answer == b"" and await closed_by_listener(sock)
    # The real ticket, by hand: accepted.
    nonce = os.urandom(NONCE_SIZE)
    good, session, answer = await handshake(port, grant, nonce=nonce)
    assert answer == b"\x01"
    # Its hello replayed: refused before the listener sends its nonce.
    sock, session2, answer = await handshake(port, grant, nonce=nonce)
    assert session2 is None and await closed_by_listener(sock)
    # A record altered on the way.
    sock, _, answer = await handshake(port, grant, tamper=True)
    assert answer == b"" and await closed_by_listener(sock)
    # A record whose length is over the limit.
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(encode_hello(grant.ticket_id, os.urandom(NONCE_SIZE)))
    await sock.receive_some(NONCE_SIZE)
    await sock.send_all((1 << 30).to_bytes(4, "big"))
    assert await closed_by_listener(sock)
    assert b.direct.stats.refused == 6

    # A bad frame on an accepted connection closes that one; the listener serves on.
    await good.send_all(session.seal(b"\x01\xc1"))  # a frame that is not msgpack: b resets that stream only
    assert await closed_by_listener(good)
    stream = await a.open_stream(b.peer_id, ECHO)
    assert isinstance(stream, DirectStream) and (await exchange(stream, "still")).text == "still"


async def test_a_handshake_that_stalls_is_closed_at_the_deadline(nursery, autojump_clock):
    # The listener alone (no libp2p host needed to grant a ticket), on virtual time.
    channel = DirectChannel(MeshSettings(direct_timeout=0.5), {ECHO: echo})
    port = await nursery.start(channel.run, "127.0.0.1")
    grant = Grant.decode(channel.grant("peer-a"))
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    await sock.send_all(encode_hello(grant.ticket_id, os.urandom(NONCE_SIZE))[:10])  # and nothing more
    assert await closed_by_listener(sock)
    assert trio.current_time() - started == pytest.approx(0.5)
    assert channel.stats.refused == 1


# --- falling back to libp2p ---------------------------------------------------------------


def dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_streams_go_over_libp2p_when_the_direct_port_is_unreachable(nursery):
    a, b = await meshes(nursery, ON, ON)
    b.direct._book.port = dead_port()  # as behind a firewall: tickets name a port nobody answers
    stream = await a.open_stream(b.peer_id, ECHO)
    assert not isinstance(stream, DirectStream)
    assert (await exchange(stream)).request_id == a.peer_id
    assert a.direct.stats.fallbacks == 1 and a.direct.stats.opened == 0
    # Not tried again for a while: the next open goes straight to libp2p.
    assert not isinstance(await a.open_stream(b.peer_id, ECHO), DirectStream)
    assert a.direct.stats.fallbacks == 1


@pytest.mark.parametrize("off", ["listener", "dialer"])
async def test_a_peer_without_the_channel_is_reached_over_libp2p(nursery, off):
    a, b = await meshes(nursery, OFF if off == "dialer" else ON, OFF if off == "listener" else ON)
    stream = await a.open_stream(b.peer_id, ECHO)
    assert not isinstance(stream, DirectStream)
    assert (await exchange(stream)).request_id == a.peer_id


async def test_a_stale_ticket_is_replaced_once_without_falling_back(nursery):
    a, b = await meshes(nursery, ON, ON)
    first = await a.open_stream(b.peer_id, ECHO)
    await exchange(first)
    b.direct._book = type(b.direct._book)(b.direct.port, ttl=600, max_tickets=8)  # b forgot its tickets
    second = await a.open_stream(b.peer_id, ECHO)
    assert isinstance(second, DirectStream) and (await exchange(second)).text == "hi"
    assert a.direct.stats.opened == 2 and a.direct.stats.fallbacks == 0 and b.direct.stats.refused == 1


# --- the federation over it -----------------------------------------------------------------


class SlowFleet:
    def __init__(self, tokens=4, delay=0.0):
        self.tokens, self.delay = tokens, delay
        self.closed_early = []

    @asynccontextmanager
    async def serve(self, request):
        done = False

        async def frames():
            nonlocal done
            for i in range(self.tokens):
                await trio.sleep(self.delay)
                yield TokenChunk(request.request_id, f"tok{i} ")
            done = True
            yield GenerateResult(request.request_id, "stop", Usage(5, self.tokens))

        gen = frames()
        try:
            yield gen
        finally:
            await gen.aclose()
            if not done:
                self.closed_early.append(request.request_id)


async def federated(nursery, tmp_path, fleet, settings=ON):
    """Operator A's federation asking B's, over real hosts; waits until A can route."""
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(2)]
    a, b = Libp2pMesh(ids[0].seed, settings), Libp2pMesh(ids[1].seed, settings)
    fa = Federation(mesh=a, identity=ids[0], operator="A", ledger=Ledger(tmp_path / "a.sqlite"),
                    offer_fn=lambda: [], settings=FederationSettings(announce_interval=0.2))
    fb = Federation(mesh=b, identity=ids[1], operator="B", ledger=Ledger(tmp_path / "b.sqlite"),
                    offer_fn=lambda: [OfferedModel("tiny", True, price_input=1.0, price_output=2.0)],
                    serve_generate=fleet.serve, settings=FederationSettings(announce_interval=0.2))
    addrs = await nursery.start(b.run)
    await nursery.start(a.run)
    await nursery.start(fb.run)
    await nursery.start(fa.run)
    await a.connect(addrs[0], timeout=10)
    with trio.fail_after(20):
        while not fa.can_route("tiny"):
            await trio.sleep(0.05)
    return fa, fb


def request(rid):
    return GenerateRequest(rid, "tiny", Task.CHAT, messages=({"role": "user", "content": "hi"},))


async def test_federated_requests_cross_the_direct_channel_on_one_connection(nursery, tmp_path):
    fa, fb = await federated(nursery, tmp_path, SlowFleet())
    for rid in ("r1", "r2", "r3"):
        async with fa.route(request(rid)) as frames:
            texts = [f.text if isinstance(f, TokenChunk) else f.finish_reason async for f in frames]
        assert texts == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "stop"]
    # One connection, reused request after request (the federation pools the stream).
    assert fa.mesh.direct.stats.opened == 1 and fb.mesh.direct.stats.accepted == 1
    assert fa.mesh.direct.stats.fallbacks == 0
    assert fa.ledger.get("consumed", "r3") is not None


async def test_cancellation_crosses_the_direct_channel(nursery, tmp_path):
    fleet = SlowFleet(tokens=200, delay=0.02)
    fa, fb = await federated(nursery, tmp_path, fleet)
    async with fa.route(request("r-cancel")) as frames:
        async for frame in frames:
            break  # the client went away after the first token
    with trio.fail_after(5):
        while "r-cancel" not in fleet.closed_early:
            await trio.sleep(0.01)
    assert fa.mesh.direct.stats.opened == 1
    # The next request is served whole (on a new connection: a cancelled one is not reused).
    async with fa.route(request("r-after")) as frames:
        assert [f async for f in frames][-1].finish_reason == "stop"
