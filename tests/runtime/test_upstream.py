"""The upstream HTTP/1.1 client over real sockets on 127.0.0.1, against scripted servers."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from scripted_server import Conn, keep_answering, serving

from helexa.runtime import BackendCrashed, Overloaded
from helexa.runtime.upstream import (
    PoolTimeout,
    Upstream,
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)


async def test_one_keep_alive_connection_serves_request_after_request(nursery: trio.Nursery) -> None:
    server = await serving(nursery, keep_answering)
    upstream = Upstream(server.url)
    for _ in range(5):
        response = await upstream.request("POST", "/v1/x", b"{}")
        assert (response.status, response.body) == (200, b"ok")
    assert server.accepted == 1 and upstream.connections == (1, 1)
    await upstream.aclose()
    assert upstream.connections == (0, 0)


async def test_chunked_and_content_length_bodies_whole_and_streamed(nursery: trio.Nursery) -> None:
    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith(b"GET /chunked"):
                await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await trio.sleep(0.01)
                await conn.send(b"2\r\nde\r\n0\r\n\r\n")
            else:
                await conn.answer(b"x" * 100_000, "500 Internal Server Error")

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    assert (await upstream.request("GET", "/chunked")).body == b"abcde"
    failed = await upstream.request("GET", "/length")
    assert failed.status == 500 and failed.body == b"x" * 100_000
    async with await upstream.stream("GET", "/chunked") as response:
        assert response.status == 200
        pieces = [p async for p in _pieces(response)]
    assert b"".join(pieces) == b"abcde" and len(pieces) == 2
    async with await upstream.stream("GET", "/length") as response:
        assert await response.read() == b"x" * 100_000
    assert server.accepted == 1 and upstream.connections == (1, 1)


async def _pieces(response):
    while data := await response.receive():
        yield data


async def test_a_connection_the_server_closed_while_idle_is_replaced(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.answer()
        await conn.stream.aclose()  # closes while idle, without saying so in the head
        closed.set()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    await upstream.request("GET", "/")
    await closed.wait()
    assert (await upstream.request("GET", "/")).body == b"ok"
    assert server.accepted == 2


CHUNKED_OK = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


async def test_a_server_that_closes_after_each_streamed_answer_finds_a_connection_dialled_ahead(
        nursery: trio.Nursery) -> None:
    # llama.cpp's server closes the connection after every streamed (chunked) answer. Once
    # the pool has seen that, the connect for the next request happens while it is idle.
    served: list[int] = []  # the connection each request came on
    closed = trio.Semaphore(0, max_value=100)

    async def handler(conn: Conn) -> None:
        if await conn.request() is not None:
            served.append(conn.index)
            await conn.send(CHUNKED_OK)
        await conn.stream.aclose()
        closed.release()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    await upstream.request("GET", "/")  # connection 1
    await closed.acquire()
    assert (await upstream.request("GET", "/")).body == b"ok"  # 1 found closed: 2 dialled on the way
    assert upstream.connections == (1, 1)  # 2 let go, 3 dialled ahead
    await closed.acquire()
    for ahead in (3, 4, 5):
        await trio.testing.wait_all_tasks_blocked()
        assert server.accepted == ahead  # accepted before the request is made
        async with await upstream.stream("GET", "/") as response:
            assert await response.read() == b"ok"
        assert served[-1] == ahead and upstream.connections == (1, 1)
        await closed.acquire()
    assert served == [1, 2, 3, 4, 5]
    await upstream.aclose()
    assert upstream.connections == (0, 0)


async def test_answers_of_known_length_keep_their_connections_beside_one_dialled_ahead(
        nursery: trio.Nursery) -> None:
    # A server that closes after streamed answers but keeps the others alive: the pool
    # holds no more connections than before, whatever the mix.
    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith(b"GET /stream"):
                await conn.send(CHUNKED_OK)
                return
            await conn.answer()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    for i in range(30):
        path = "/stream" if i % 3 else "/plain"
        assert (await upstream.request("GET", path)).body == b"ok"
        await trio.testing.wait_all_tasks_blocked()
        assert upstream.connections[0] <= 2
    await upstream.aclose()


async def test_a_streamed_answer_that_says_connection_close_has_the_next_connection_dialled_ahead(
        nursery: trio.Nursery) -> None:
    async def handler(conn: Conn) -> None:
        if await conn.request() is not None:
            await conn.send(CHUNKED_OK.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1))

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    assert (await upstream.request("GET", "/")).body == b"ok"
    for n in (2, 3, 4):
        await trio.testing.wait_all_tasks_blocked()
        assert server.accepted == n  # accepted before the request is made
        async with await upstream.stream("GET", "/") as response:
            assert await response.read() == b"ok"
        assert upstream.connections == (1, 1)
    await upstream.aclose()


async def test_a_connection_dialled_ahead_to_a_server_gone_since_fails_like_any_connect() -> None:
    async with trio.open_nursery() as servers:
        async def handler(conn: Conn) -> None:
            await conn.request()
            await conn.send(CHUNKED_OK)
            await conn.stream.aclose()

        server = await serving(servers, handler)
        upstream = Upstream(server.url)
        await upstream.request("GET", "/")
        await trio.sleep(0.05)  # the server closed connection 1
        await upstream.request("GET", "/")  # 2 dialled on the way, 3 ahead
        await trio.testing.wait_all_tasks_blocked()
        assert server.accepted == 3
        servers.cancel_scope.cancel()
    with pytest.raises(UpstreamUnreachable):
        await upstream.request("GET", "/")
    assert upstream.connections == (0, 0)


async def test_a_request_racing_the_servers_idle_close_is_retried_once(nursery: trio.Nursery) -> None:
    requests = []

    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            requests.append((conn.index, req[1]))
            if conn.index == 1 and len(requests) == 2:
                return  # the second request on the first connection: closed unanswered
            await conn.answer()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    await upstream.request("POST", "/", b"first")
    assert (await upstream.request("POST", "/", b"second")).body == b"ok"
    assert requests == [(1, b"first"), (1, b"second"), (2, b"second")]


async def test_a_new_connection_closed_unanswered_is_not_retried(nursery: trio.Nursery) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    with pytest.raises(UpstreamClosed) as caught:
        await upstream.request("POST", "/", b"{}")
    assert caught.value.code == "backend_crashed" and isinstance(caught.value, BackendCrashed)
    assert server.accepted == 1 and upstream.connections == (0, 0)


async def test_a_server_dying_mid_stream_is_an_error_after_what_it_sent(nursery: trio.Nursery) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    async with await upstream.stream("POST", "/", b"{}") as response:
        assert await response.receive() == b"hello"
        with pytest.raises(UpstreamClosed, match="inside a chunked body"):
            await response.receive()
    assert upstream.connections == (0, 0)


async def test_leaving_a_stream_early_closes_its_connection(nursery: trio.Nursery) -> None:
    saw_close = trio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 1:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await conn.until_closed()
            saw_close.set()
        else:
            await keep_answering(conn)

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    with trio.move_on_after(5):
        async with await upstream.stream("POST", "/", b"{}") as response:
            assert await response.receive() == b"hello"
        await saw_close.wait()
    assert saw_close.is_set() and upstream.connections == (0, 0)
    assert (await upstream.request("GET", "/")).body == b"ok"
    assert server.accepted == 2


async def test_a_cancelled_read_closes_the_connection(nursery: trio.Nursery) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 1:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await conn.until_closed()
        else:
            await keep_answering(conn)

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    response = await upstream.stream("POST", "/", b"{}")
    with trio.move_on_after(0.05):
        await response.receive()
    assert upstream.connections == (0, 0)
    await response.aclose()
    assert (await upstream.request("GET", "/")).body == b"ok" and server.accepted == 2


@pytest.mark.parametrize("wire", [b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n", b"garbage\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nQQ\r\n"])
async def test_a_malformed_response_is_a_clean_error(nursery: trio.Nursery, wire: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(wire)
        await conn.until_closed()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url)
    with pytest.raises(UpstreamProtocolError) as caught:
        await upstream.request("GET", "/")
    assert caught.value.code == "bad_upstream_response"
    assert upstream.connections == (0, 0)


async def test_nothing_listening_is_unreachable() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamUnreachable) as caught:
        await upstream.request("GET", "/")
    assert caught.value.code == "backend_crashed" and upstream.connections == (0, 0)


async def test_a_server_that_never_answers_times_out_at_the_read_deadline(nursery: trio.Nursery, autojump_clock) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await trio.sleep_forever()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url, read_timeout=30)
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout) as caught:
        await upstream.request("GET", "/")
    assert trio.current_time() - start == 30
    assert caught.value.code == "upstream_timeout" and upstream.connections == (0, 0)


async def test_each_piece_of_a_stream_has_its_own_read_deadline(nursery: trio.Nursery, autojump_clock) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"a", b"b"):
            await trio.sleep(20)
            await conn.send(b"1\r\n%s\r\n" % piece)
        await trio.sleep_forever()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url, read_timeout=30)
    start = trio.current_time()
    async with await upstream.stream("GET", "/") as response:
        assert await response.receive() == b"a"
        assert await response.receive() == b"b"
        assert trio.current_time() - start == 40
        with pytest.raises(UpstreamTimeout):
            await response.receive()
    assert trio.current_time() - start == 70


async def test_a_server_that_stops_reading_times_out_at_the_write_deadline(nursery: trio.Nursery, autojump_clock) -> None:
    async def handler(conn: Conn) -> None:
        await trio.sleep_forever()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url, write_timeout=7)
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout, match="not accepted"):
        await upstream.request("POST", "/", b"x" * (64 << 20))
    assert trio.current_time() - start == 7


async def test_a_full_pool_waits_for_a_connection_then_gives_up(nursery: trio.Nursery, autojump_clock) -> None:
    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req[0].startswith(b"GET /slow"):
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
                await trio.sleep(5)
                await conn.send(b"ok")
            else:
                await conn.answer()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url, max_connections=1, connect_timeout=10)
    async with await upstream.stream("GET", "/slow") as busy:
        start = trio.current_time()
        with pytest.raises(PoolTimeout) as caught:
            await upstream.request("GET", "/")
        assert trio.current_time() - start == 10
        assert isinstance(caught.value, Overloaded) and caught.value.retryable
        assert await busy.read() == b"ok"  # read to its end: the connection goes back to the pool
    # A waiting request takes the connection as soon as it is given back.
    async with await upstream.stream("GET", "/slow") as busy:
        async with trio.open_nursery() as waiters:
            waiters.start_soon(upstream.request, "GET", "/")
            start = trio.current_time()
            assert await busy.read() == b"ok"
        assert trio.current_time() - start == 5
    assert server.accepted == 1


async def test_idle_connections_expire(nursery: trio.Nursery, autojump_clock) -> None:
    server = await serving(nursery, keep_answering)
    upstream = Upstream(server.url, idle_timeout=4)
    await upstream.request("GET", "/")
    await trio.sleep(3.9)
    await upstream.request("GET", "/")
    assert server.accepted == 1
    await trio.sleep(4)
    await upstream.request("GET", "/")
    assert server.accepted == 2 and upstream.connections == (1, 1)


def test_a_bad_url_or_header_is_refused() -> None:
    with pytest.raises(ValueError):
        Upstream("ftp://example.com")
    with pytest.raises(ValueError):
        Upstream("http://127.0.0.1:1", headers=(("authorization", "a\nb"),))


async def test_connections_are_dialled_with_nagle_off(nursery: trio.Nursery) -> None:
    # A request's last segment must not wait for the server's delayed ACK.
    server = await serving(nursery, keep_answering)
    upstream = Upstream(server.url)
    assert (await upstream.request("GET", "/")).status == 200
    (conn,) = upstream._idle
    assert conn.sock is not None and conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await upstream.aclose()


async def test_headers_set_later_go_with_every_request_from_then_on(nursery: trio.Nursery) -> None:
    # A supervised server restarted with a new key: the prepared request heads change with it.
    heads: list[bytes] = []

    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            heads.append(req[0])
            await conn.answer()

    server = await serving(nursery, handler)
    upstream = Upstream(server.url, headers=(("authorization", "Bearer one"),))
    await upstream.request("POST", "/v1/x", b"{}")
    upstream.set_headers((("authorization", "Bearer two"),))
    await upstream.request("POST", "/v1/x", b"{}")
    await upstream.request("POST", "/v1/x", b"{}")
    assert [h.count(b"authorization: Bearer") for h in heads] == [1, 1, 1]
    assert b"Bearer one" in heads[0] and all(b"Bearer two" in h for h in heads[1:])
    with pytest.raises(ValueError):
        upstream.set_headers((("authorization", "a\r\nb"),))
    await upstream.aclose()
