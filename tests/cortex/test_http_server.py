"""The lean HTTP/1.1 server's trio shell, driven over real sockets on 127.0.0.1 by a raw
TCP client (:mod:`raw_http`; the HTTP decisions themselves are tested without I/O in
``test_http_connection.py``): keep-alive, request bodies and methods, errors. (How a
request or connection ends, a client going away, deadlines and shutdown:
``test_http_server_ends.py``.)

Nothing here waits for wall-clock time: steps are ordered by events and
``wait_all_tasks_blocked``, and the deadlines run on trio's autojump clock (loopback
delivers bytes within the ``send`` call, so a read never waits on the clock) and are
asserted to the exact virtual second.
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from helexa.roles.cortex.http import BODY_EXTENSION, plain_error
from raw_http import Client, echo, read_body, respond, serving


# --- keep-alive ---------------------------------------------------------------------------


async def test_several_requests_are_served_on_one_connection() -> None:
    async with serving(echo) as (_, port):
        client = await Client.connect(port)
        answers = [(await client.request("GET", f"/n/{i}?x={i}")).json() for i in range(3)]
    assert [(a["path"], a["query"]) for a in answers] == [("/n/0", "x=0"), ("/n/1", "x=1"), ("/n/2", "x=2")]
    assert len({tuple(a["client"]) for a in answers}) == 1  # one connection, one client port


async def test_connection_close_from_the_client_is_honoured() -> None:
    async with serving(echo) as (_, port):
        client = await Client.connect(port)
        r = await client.request("GET", "/", headers="connection: close\r\n")
        assert r.status == 200 and r.headers["connection"] == "close"
        assert await client.rest() == b""


async def test_the_connection_closes_after_keep_alive_max_requests() -> None:
    async with serving(echo, keep_alive_max_requests=2) as (_, port):
        client = await Client.connect(port)
        first = await client.request()
        second = await client.request()
        assert "connection" not in first.headers and second.headers["connection"] == "close"
        assert await client.rest() == b""


async def _serve_back_to_back(app_yields: bool, requests: int = 5) -> list[int]:
    """Serve ``requests`` on one connection whose next request is always in the socket by
    the time the server reads (the app sends it on the client's behalf through a blocking
    stdlib socket, which never yields); returns the serving task's count of yields to the
    scheduler (trio's ``Task._schedule_points``) as each request reached the app."""
    seen: list[int] = []
    raw: list[socket.socket] = []

    async def app(scope, receive, send) -> None:
        seen.append(trio.lowlevel.current_task()._schedule_points)
        if app_yields:
            await trio.lowlevel.checkpoint()
        await respond(send, b"ok")
        if len(seen) < requests:
            raw[0].send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")

    async with serving(app) as (_, port):
        raw.append(socket.create_connection(("127.0.0.1", port)))
        try:
            raw[0].send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            while len(seen) < requests:
                await wait_all_tasks_blocked()
        finally:
            raw[0].close()
    return seen


async def test_a_client_whose_next_request_is_always_there_still_lets_other_tasks_run() -> None:
    # An app that never yields, and a request always waiting: the serving task must still
    # yield once per request, or one busy keep-alive client would starve every other.
    seen = await _serve_back_to_back(app_yields=False)
    assert [b - a for a, b in zip(seen, seen[1:])] == [1, 1, 1, 1]


async def test_a_request_that_already_yielded_is_not_made_to_yield_again_at_the_next_read() -> None:
    # (A request that went to a neuron waited for its answer: one more pass through the
    # scheduler at the read was a measured share of a request's cost.)
    seen = await _serve_back_to_back(app_yields=True)
    assert [b - a for a, b in zip(seen, seen[1:])] == [1, 1, 1, 1]


async def test_trio_still_counts_each_tasks_yields_in_schedule_points() -> None:
    # The server's read decides whether to yield by this count (see the tests above); if a
    # trio upgrade moved or dropped it, this says so.
    task = trio.lowlevel.current_task()
    before = task._schedule_points
    await trio.lowlevel.checkpoint_if_cancelled()
    assert task._schedule_points == before
    await trio.lowlevel.checkpoint()
    assert task._schedule_points == before + 1


# --- request bodies and methods -----------------------------------------------------------


async def test_a_post_body_arrives_whole() -> None:
    async with serving(echo) as (_, port):
        client = await Client.connect(port)
        r = await client.request("POST", "/v1/x", body=b'{"a": 1}')
    assert r.json()["body"] == '{"a": 1}' and r.json()["parts"] == 1 and r.json()["method"] == "POST"


async def test_a_body_that_came_with_its_head_is_given_in_the_scope_and_by_receive_too() -> None:
    seen = []
    called = trio.Event()

    async def app(scope, receive, send) -> None:
        given = scope.get("extensions", {}).get(BODY_EXTENSION)
        called.set()
        seen.append((given, await read_body(receive)))
        await respond(send, b"ok")

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.request("POST", "/v1/x", body=b'{"a": 1}')
        called = trio.Event()
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\n")
        await called.wait()  # the body follows once the app runs
        await client.send(b"hello")
        await client.response()
    assert seen == [(b'{"a": 1}', (b'{"a": 1}', 1)), (None, (b"hello", 1))]


async def test_a_chunked_request_body_arrives_in_its_chunks() -> None:
    parts = []
    first_read = trio.Event()

    async def app(scope, receive, send) -> None:
        while True:
            msg = await receive()
            parts.append((msg["body"], msg["more_body"]))
            first_read.set()
            if not msg["more_body"]:
                break
        await respond(send, b"".join(p for p, _ in parts))

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await first_read.wait()
        await client.send(b"6\r\n world\r\n0\r\n\r\n")
        r = await client.response()
    assert r.body == b"hello world" and parts == [(b"hello", True), (b" world", False)]


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async with serving(echo) as (_, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        interim = await client.response()
        assert interim.status == 100 and client.buf == b""
        await client.send(b"hello")
        r = await client.response()
    assert r.status == 200 and r.json()["body"] == "hello"


async def test_head_gets_the_headers_and_no_body() -> None:
    async def app(scope, receive, send) -> None:
        await respond(send, b"hello", headers=[(b"content-length", b"5")])

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        head = await client.request("HEAD", "/")
        get = await client.request("GET", "/")  # a stray body from the HEAD would garble this one
    assert head.status == 200 and head.headers["content-length"] == "5" and head.body == b""
    assert get.body == b"hello"


async def test_a_request_answered_without_reading_its_body_keeps_the_connection() -> None:
    async def app(scope, receive, send) -> None:  # as a GET handler does: never calls receive()
        await respond(send, scope["path"].encode())

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        got = [(await client.request("GET", "/a")).body, (await client.request("POST", "/b", body=b"unread")).body,
               (await client.request("GET", "/c")).body]
    assert got == [b"/a", b"/b", b"/c"]


async def test_a_body_left_unread_and_still_arriving_closes_the_connection() -> None:
    async def app(scope, receive, send) -> None:
        await respond(send, b"early")

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\nabc")
        assert (await client.response()).body == b"early"
        assert await client.rest() == b""


async def test_a_streamed_response_arrives_chunked_and_complete() -> None:
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await trio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        r = await client.request()
        again = await client.request()
    assert r.headers["transfer-encoding"] == "chunked" and r.body == b"one two three"
    assert again.body == b"one two three"


async def test_a_response_larger_than_the_socket_buffer_arrives_whole() -> None:
    big = bytes(range(256)) * (32 << 10)  # 8 MiB: os.write takes a part, trio sends the rest

    async def app(scope, receive, send) -> None:
        await respond(send, big)

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        assert (await client.request()).body == big
        assert (await client.request()).body == big


async def test_http_1_0_gets_its_stream_until_the_connection_closes() -> None:
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two", b""):
            await send({"type": "http.response.body", "body": part, "more_body": bool(part)})

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        head = await client.read_until(b"\r\n\r\n")
        assert await client.rest() == b"one two"
    assert b"connection: close" in head and b"content-length" not in head


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02 not http at all\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nthis is no header\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: twelve\r\n\r\n",
])
async def test_malformed_http_gets_a_400_envelope_and_the_connection_closes(garbage: bytes) -> None:
    async with serving(echo) as (_, port):
        healthy = await Client.connect(port)
        bad = await Client.connect(port)
        await bad.send(garbage)
        r = await bad.response()
        assert await bad.rest() == b""
        assert (await healthy.request("GET", "/still")).json()["path"] == "/still"
    assert r.status == 400 and r.headers["connection"] == "close"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


async def test_without_an_error_renderer_malformed_http_gets_a_line_of_text() -> None:
    async with serving(echo, error_body=plain_error) as (_, port):
        bad = await Client.connect(port)
        await bad.send(b"\x00 not http\r\n\r\n")
        r = await bad.response()
    assert r.status == 400 and r.headers["content-type"].startswith("text/plain")
    assert r.body.startswith(b"400 Bad Request: malformed HTTP request")


async def test_an_app_failing_before_it_answers_gives_one_500_envelope_without_the_traceback(caplog) -> None:
    async def app(scope, receive, send) -> None:
        if scope["path"] == "/boom":
            raise RuntimeError("secret internals")
        await echo(scope, receive, send)

    caplog.set_level(logging.ERROR, logger="helexa.roles.cortex.http.server")
    async with serving(app) as (_, port):
        client = await Client.connect(port)
        r = await client.request("GET", "/boom")
        after = await client.rest()
        assert (await (await Client.connect(port)).request("GET", "/fine")).status == 200
    assert r.status == 500 and r.headers["connection"] == "close"
    assert r.json()["error"]["type"] == "internal_error"
    assert "secret" not in r.body.decode() and "Traceback" not in r.body.decode()
    assert after == b""  # nothing after the one response
    assert any(rec.exc_info and "secret internals" in str(rec.exc_info[1]) for rec in caplog.records)


async def test_an_app_that_never_answers_gives_a_500_envelope() -> None:
    async def app(scope, receive, send) -> None:
        await read_body(receive)

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        r = await client.request()
        assert await client.rest() == b""
    assert r.status == 500 and r.json()["error"]["type"] == "internal_error"


async def test_a_body_that_stops_arriving_gets_a_408_after_read_timeout_and_the_connection_closes(
        autojump_clock) -> None:
    seen = []

    async def app(scope, receive, send) -> None:
        while (msg := await receive()).get("more_body"):
            pass
        seen.append(msg)

    async with serving(app, read_timeout=20) as (_, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
        start = trio.current_time()
        r = await client.response()
        waited = trio.current_time() - start
        rest = await client.rest()
    assert seen == [{"type": "http.disconnect"}]
    assert r.status == 408 and "did not arrive within 20s" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "request_timeout" and waited == 20
    assert r.headers.get("connection") == "close" and rest == b""
