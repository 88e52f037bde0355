"""An HTTP/2 connection to a TLS portal (hypercorn) has the deadlines an HTTP/1.1 one has
(:mod:`helexa.roles.cortex.h2_guard`): idle, it lives until ``keep_alive_timeout`` whatever
PING or SETTINGS it carries; a request head left unfinished is cut at ``body_timeout``
(a GOAWAY) while the streams already running complete; a body that stops is a 408 at
``body_timeout``, and its late DATA resets that stream only; an answer the client takes
no window or no bytes for is cut at ``send_timeout``. Raw frames over a real TLS socket
(:mod:`h2_client`), small timeouts: ``body_timeout`` 1 s, ``keep_alive_timeout`` 3 s,
``send_timeout`` 1 s where it is tested."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from hyperframe.frame import ContinuationFrame, SettingsFrame, WindowUpdateFrame

from h2_client import PREFACE, H2Client
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, new_key, portals, self_signed

CHAT = {"model": "fast", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "x"}]}
REFUSED_STREAM = 0x7


@asynccontextmanager
async def tls_portal(tmp_path, **gateway: float) -> AsyncIterator[tuple[str, int, str]]:
    """A TLS portal whose chat streams 8 tokens over 2.4 s, with embeddings: (CA file, port, key)."""
    cert_file, key_file = self_signed(tmp_path)
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"), tokens=8, token_delay=0.3)
    store = SqliteStore(":memory:")
    key = new_key(store, "a")
    tables = {"a": acme(tls_cert_file=str(cert_file), tls_key_file=str(key_file))}
    limits = {"body_timeout": 1.0, "keep_alive_timeout": 3.0, **gateway}
    async with portals(fleet, tables, store=store, gateway=limits) as (_, urls):
        yield str(cert_file), int(urls["a"].rsplit(":", 1)[1]), key


def request(key: str, path: str = "/v1/chat/completions") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path.encode()),
            (b"authorization", b"Bearer " + key.encode()), (b"content-type", b"application/json")]


async def start_chat(client: H2Client, key: str) -> None:
    """Stream 1: a chat streamed for 2.4 s."""
    await client.send(client.headers(1, request(key)), client.data(1, json.dumps(CHAT).encode(), end_stream=True))


def tokens(client: H2Client, stream_id: int) -> list[str]:
    lines = client.body(stream_id).decode().splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c["choices"] and c["choices"][0]["delta"].get("content")]


async def test_an_idle_h2_connection_lives_until_keep_alive_whatever_ping_or_settings_it_carries(tmp_path) -> None:
    async with tls_portal(tmp_path) as (cafile, port, _):
        client = await H2Client.open(cafile, port)
        opened = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            await trio.sleep(0.5)
            await client.send(client.ping(b"ping-one"))
            await trio.sleep(1.0)
            await client.send(SettingsFrame(0, settings={0x4: 65535}))
            await trio.sleep(0.5)  # 2 s in: twice body_timeout after the preface, 1.5 s after the PING
            await client.send(client.ping(b"ping-two"))
            answered = await client.wait_for("PingFrame", timeout=1, flag="ACK", opaque_data=b"ping-two")
            assert answered is not None and answered - opened < 2.5  # still open past body_timeout
            closed = await client.wait_closed()
            assert closed is not None and 2.8 <= closed - opened < 4.5, closed and closed - opened  # keep-alive: 3 s


@pytest.mark.parametrize("unfinished", ["header block", "frame"])
async def test_an_unfinished_head_beside_a_running_stream_is_cut_at_the_deadline_and_the_stream_completes(
        tmp_path, unfinished: str) -> None:
    """A HEADERS frame with no END_HEADERS (its CONTINUATION never sent), or a frame sent in
    part: a GOAWAY (NO_ERROR, last stream 1) within the head deadline of 1 s, stream 1's
    answer whole after it, and the connection closed once stream 1 ends."""
    async with tls_portal(tmp_path) as (cafile, port, key):
        client = await H2Client.open(cafile, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            await start_chat(client, key)
            await trio.sleep(0.3)
            head = client.headers(3, request(key), end_stream=True, end_headers=unfinished == "frame").serialize()
            await client.send_raw(head if unfinished == "header block" else head[:12])
            sent = trio.current_time()
            away = await client.wait_for("GoAwayFrame", timeout=5)
            assert away is not None and 0.8 <= away - sent < 1.8, away and away - sent
            goaway = next(f for _, f in client.frames if type(f).__name__ == "GoAwayFrame")
            assert (goaway.last_stream_id, goaway.error_code) == (1, 0)
            ended = await client.wait_for("DataFrame", 1, timeout=5, flag="END_STREAM")
            assert ended is not None and ended > away
            assert client.status(1) == 200 and len(tokens(client, 1)) == 8
            assert client.status(3) is None  # never served
            closed = await client.wait_closed(timeout=5)
            assert closed is not None and closed - ended < 1, closed and closed - ended  # not keep-alive's 3 s


async def test_a_stalled_body_beside_a_running_stream_is_a_408_and_its_late_data_resets_that_stream_only(
        tmp_path) -> None:
    """Stream 3's body stops: a 408 at body_timeout (1 s) in the OpenAI shape, as on
    HTTP/1.1; DATA it sends after that resets stream 3 (NO_ERROR), not the connection;
    stream 1 completes, and the connection closes at keep-alive after its last stream."""
    async with tls_portal(tmp_path) as (cafile, port, key):
        client = await H2Client.open(cafile, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            await start_chat(client, key)
            await trio.sleep(0.3)
            await client.send(client.headers(3, request(key)), client.data(3, b"{"))
            sent = trio.current_time()
            answered = await client.wait_for("HeadersFrame", 3, timeout=5)
            assert answered is not None and 0.8 <= answered - sent < 1.8
            assert client.status(3) == 408
            assert await client.wait_for("DataFrame", 3, timeout=2, flag="END_STREAM") is not None
            assert json.loads(client.body(3))["error"]["code"] == "request_timeout"
            await client.send(client.data(3, b" " * 100))  # the rest of the body, late
            reset = await client.wait_for("RstStreamFrame", 3, timeout=2)
            assert reset is not None
            assert [f.error_code for _, f in client.frames if type(f).__name__ == "RstStreamFrame"] == [0]
            ended = await client.wait_for("DataFrame", 1, timeout=5, flag="END_STREAM")
            assert ended is not None and client.status(1) == 200 and len(tokens(client, 1)) == 8
            closed = await client.wait_closed(timeout=6)
            assert closed is not None and 2.8 <= closed - ended < 4, closed and closed - ended  # keep-alive: 3 s
        # The portal serves on (hypercorn's failure on the late DATA took its server down).
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cafile), timeout=5) as http:
            r = await http.get(f"https://localhost:{port}/health")
            assert r.status_code == 200


async def test_a_stream_begun_after_the_goaway_is_refused(tmp_path) -> None:
    """The unfinished header block is finished after the GOAWAY that gave up on it: that
    stream (3) is refused (RST_STREAM REFUSED_STREAM) and never reaches the app, while
    stream 1 completes."""
    async with tls_portal(tmp_path) as (cafile, port, key):
        client = await H2Client.open(cafile, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            await start_chat(client, key)
            await trio.sleep(0.3)
            head = client.headers(3, request(key), end_stream=True, end_headers=False)
            block = head.data
            head.data = block[:4]
            await client.send(head)
            assert await client.wait_for("GoAwayFrame", timeout=5) is not None
            await client.send(ContinuationFrame(3, data=block[4:], flags={"END_HEADERS"}))
            assert await client.wait_for("RstStreamFrame", 3, timeout=2, error_code=REFUSED_STREAM) is not None
            assert await client.wait_for("DataFrame", 1, timeout=5, flag="END_STREAM") is not None
            assert client.status(1) == 200 and len(tokens(client, 1)) == 8 and client.status(3) is None


async def test_hypercorns_failure_on_one_connection_ends_that_connection_not_the_gateway(tmp_path, monkeypatch) -> None:
    """With the late DATA let through to hypercorn (the guard's filter off), hypercorn fails
    on a stream it no longer knows (a KeyError): that connection ends, logged, and the
    portal serves on, where the failure stopped the whole gateway."""
    from helexa.roles.cortex.h2_guard import H2Guard

    monkeypatch.setattr(H2Guard, "_refused", lambda self, event: False)
    async with tls_portal(tmp_path) as (cafile, port, key):
        client = await H2Client.open(cafile, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            await client.send(client.headers(3, request(key)), client.data(3, b"{"))
            assert await client.wait_for("DataFrame", 3, timeout=5, flag="END_STREAM") is not None  # the 408
            await client.send(client.data(3, b" " * 100))
            assert await client.wait_closed(timeout=5) is not None
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cafile), timeout=5) as http:
            r = await http.get(f"https://localhost:{port}/health")
            assert r.status_code == 200


async def test_a_stream_whose_client_opens_no_window_for_its_answer_is_reset_at_send_timeout(tmp_path) -> None:
    """The client allows 16 bytes of DATA a stream and never opens more: the answer cannot
    go out, as from an HTTP/1.1 client that reads nothing. At ``send_timeout`` (1 s) the
    stream is reset (CANCEL) and its request ends: the connection, with no stream left,
    then closes at keep-alive (3 s). Hypercorn alone waits for ever."""
    async with tls_portal(tmp_path, send_timeout=1.0) as (cafile, port, key):
        client = await H2Client.open(cafile, port, settings={0x4: 16})  # SETTINGS_INITIAL_WINDOW_SIZE
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read)
            started = trio.current_time()
            await start_chat(client, key)
            reset = await client.wait_for("RstStreamFrame", 1, timeout=8)
            assert reset is not None and reset - started < 5, reset and reset - started  # 2.4 s of tokens, then 1 s
            assert [f.error_code for _, f in client.frames if type(f).__name__ == "RstStreamFrame"] == [0x8]
            assert client.status(1) == 200 and len(client.body(1)) == 16
            closed = await client.wait_closed(timeout=6)
            assert closed is not None and 2.8 <= closed - reset < 4.5, closed and closed - reset


async def test_a_client_that_takes_no_bytes_loses_the_connection_at_send_timeout(tmp_path) -> None:
    """Twenty embeddings answers (~2.8 MB) asked for with every window open, then nothing
    read: the server's writes stop, and at ``send_timeout`` (1 s) it drops the connection,
    as the lean server does, where hypercorn's write waited for ever (shielded)."""
    async with tls_portal(tmp_path, send_timeout=1.0) as (cafile, port, key):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["h2"])
        stream = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname="localhost")
        await stream.do_handshake()
        client = H2Client(stream)
        await client.send_raw(PREFACE + SettingsFrame(0, settings={0x4: 2**31 - 1}).serialize()
                              + WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535).serialize())
        body = json.dumps({"model": "embed", "input": ["x"] * 2048}).encode()
        got, ended = 0, False
        try:
            for stream_id in range(1, 41, 2):
                await client.send(client.headers(stream_id, request(key, "/v1/embeddings")),
                                  client.data(stream_id, body, end_stream=True))
        except trio.BrokenResourceError:
            ended = True  # cut already, on a machine slow to send the twenty (over 1 s)
        await trio.sleep(3)
        with trio.move_on_after(2):
            try:
                while data := await stream.receive_some(65536):
                    got += len(data)
            except trio.BrokenResourceError:
                pass
            ended = True
        assert ended and got < 1_000_000, (ended, got)  # cut: not the 2.8 MB
