"""The lean HTTP/1.1 server's trio shell, driven over real sockets on 127.0.0.1 by a raw
TCP client (the HTTP decisions themselves are tested without I/O in
``test_http_connection.py``).

A raw client says exactly what goes over the wire (one connection or several, a head
sent in pieces, a socket closed mid-request), which httpx would hide. Nothing here waits
for wall-clock time: steps are ordered by events and ``wait_all_tasks_blocked``, and the
deadlines run on trio's autojump clock (loopback delivers bytes within the ``send`` call,
so a read never waits on the clock) and are asserted to the exact virtual second.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from helexa.roles.cortex.gateway import server_error_body
from helexa.roles.cortex.http import BODY_EXTENSION, ClientGone, HttpServer, plain_error


def guard() -> trio.CancelScope:
    """A limit on a test that hangs: 10 s, or 1,000 virtual seconds on the autojump clock."""
    return trio.fail_after(1000 if isinstance(trio.lowlevel.current_clock(), MockClock) else 10)


@asynccontextmanager
async def serving(app, **options) -> AsyncIterator[tuple[HttpServer, int]]:
    # As the gateway runs it: the server's own error responses carry OpenAI's envelope.
    options.setdefault("error_body", server_error_body)
    server = HttpServer(app, port=0, **options)
    with guard():
        async with trio.open_nursery() as nursery:
            url = (await nursery.start(server.run))[0]
            yield server, int(url.rsplit(":", 1)[1])
            nursery.cancel_scope.cancel()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Client:
    """One TCP connection, with just enough HTTP/1.1 parsing to read responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError(f"the server closed the connection; unread: {self.buf!r}")
        self.buf += data

    async def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            await self._fill()
        head, _, self.buf = self.buf.partition(marker)
        return head

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    async def response(self, *, to_head: bool = False) -> Response:
        head = (await self.read_until(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if to_head or status < 200:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(await self.read_until(b"\r\n"), 16):
                body += await self.read_exactly(size)
                await self.read_exactly(2)
            await self.read_until(b"\r\n")
        else:
            body = await self.read_exactly(int(headers["content-length"]))
        return Response(status, headers, body)

    async def request(self, method: str = "GET", target: str = "/", body: bytes = b"", headers: str = "") -> Response:
        length = f"content-length: {len(body)}\r\n" if body else ""
        await self.send(f"{method} {target} HTTP/1.1\r\nhost: t\r\n{length}{headers}\r\n".encode() + body)
        return await self.response(to_head=method == "HEAD")

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def read_body(receive) -> tuple[bytes, int]:
    body, parts = b"", 0
    while True:
        msg = await receive()
        assert msg["type"] == "http.request"
        body += msg.get("body", b"")
        parts += 1
        if not msg.get("more_body", False):
            return body, parts


async def respond(send, body: bytes, status: int = 200, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def echo(scope, receive, send) -> None:
    """Answers with what it was asked, as JSON."""
    body, parts = await read_body(receive)
    await respond(send, json.dumps({
        "method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
        "client": list(scope["client"]), "body": body.decode(), "parts": parts,
    }).encode(), headers=[(b"content-type", b"application/json")])


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


# --- disconnects --------------------------------------------------------------------------


async def test_receive_after_the_body_reports_the_client_closing_its_socket(autojump_clock) -> None:
    seen: dict[str, object] = {}
    done = trio.Event()

    async def app(scope, receive, send) -> None:
        await read_body(receive)
        seen["message"] = await receive()
        seen["at"] = trio.current_time()
        try:
            await respond(send, b"too late")
        except OSError as exc:
            seen["send"] = exc
        done.set()

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi")
        await wait_all_tasks_blocked()
        assert "message" not in seen  # still connected: receive() waits
        closed_at = trio.current_time()
        await client.aclose()
        await done.wait()
    assert seen["message"] == {"type": "http.disconnect"}
    assert seen["at"] == closed_at  # noticed at once, not on a poll
    assert isinstance(seen["send"], ClientGone)


async def test_receive_after_the_response_ended_reports_a_disconnect_at_once() -> None:
    seen = []

    async def app(scope, receive, send) -> None:
        await read_body(receive)
        await respond(send, b"done")
        with trio.testing.assert_no_checkpoints():  # at once: it does not even yield
            seen.append(await receive())

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        assert (await client.request()).body == b"done"
        assert (await client.request()).body == b"done"  # and the connection is still good
    assert seen == [{"type": "http.disconnect"}] * 2


async def test_a_pipelined_request_is_not_taken_for_a_disconnect() -> None:
    log: list[tuple[bytes, str]] = []
    watching = trio.Event()
    second_sent = trio.Event()

    async def app(scope, receive, send) -> None:
        body, _ = await read_body(receive)

        async def watch() -> None:  # as the disconnect watch does, beside the handler
            log.append((body, (await receive())["type"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await wait_all_tasks_blocked()  # the watch peeks at the socket
            watching.set()
            await second_sent.wait()
            await wait_all_tasks_blocked()  # it has seen the next request arrive, and waits
            log.append((body, "responding"))
            await respond(send, body)

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\none")
        await watching.wait()
        await client.send(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\ntwo")
        second_sent.set()
        first = await client.response()
        second = await client.response()
        await client.aclose()
    assert (first.body, second.body) == (b"one", b"two")
    assert log == [(b"one", "responding"), (b"one", "http.disconnect"),
                   (b"two", "responding"), (b"two", "http.disconnect")]


async def test_send_to_a_client_that_went_away_raises_client_gone() -> None:
    failure = []
    started, failed = trio.Event(), trio.Event()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
                started.set()
                await trio.lowlevel.checkpoint()
        except OSError as exc:
            failure.append(exc)
            failed.set()
            raise

    async with serving(app) as (_, port):
        client = await Client.connect(port)
        await client.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        await started.wait()
        await client.aclose()
        await failed.wait()
    assert isinstance(failure[0], ClientGone) and isinstance(failure[0], OSError)


# --- deadlines ----------------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_timeout(autojump_clock) -> None:
    async with serving(echo, keep_alive_timeout=75) as (_, port):
        client = await Client.connect(port)
        await client.request()
        start = trio.current_time()
        assert await client.rest() == b""
        waited = trio.current_time() - start
    assert waited == 75


async def test_a_request_head_that_never_completes_is_dropped_after_read_timeout(autojump_clock) -> None:
    async with serving(echo, keep_alive_timeout=75, read_timeout=30) as (_, port):
        client = await Client.connect(port)
        await client.send(b"GET / HTTP/1.1\r\nhost: t\r\n")
        start = trio.current_time()
        assert await client.rest() == b""
        waited = trio.current_time() - start
    assert waited == 30


async def test_a_request_head_trickled_byte_by_byte_is_dropped_after_read_timeout_in_all(autojump_clock) -> None:
    # Each byte arrives well within read_timeout, but the head as a whole must not take longer.
    # The deadline falls between two bytes: a byte arriving as the server closes would
    # make the close a reset.
    async with serving(echo, keep_alive_timeout=75, read_timeout=9.5) as (_, port):
        client = await Client.connect(port)
        start = trio.current_time()
        closed = None

        async def trickle() -> None:
            try:
                for byte in b"GET / HTTP/1.1\r\nhost: trickle\r\nx-pad: " + b"a" * 100:
                    await client.send(bytes([byte]))
                    await trio.sleep(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert await client.rest() == b""
            closed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert closed == 9.5


async def test_a_client_that_stops_reading_is_dropped_after_send_timeout(autojump_clock) -> None:
    failure = []
    done = trio.Event()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started = trio.current_time()
        try:
            await send({"type": "http.response.body", "body": b"x" * (64 << 20)})  # more than any socket buffer
        except OSError as exc:
            failure.append((exc, trio.current_time() - started))
        done.set()

    async with serving(app, send_timeout=60) as (_, port):
        client = await Client.connect(port)
        await client.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")  # and never reads
        await done.wait()
    (exc, took), = failure
    assert isinstance(exc, ClientGone) and "60s" in str(exc) and took == 60


# --- shutdown -----------------------------------------------------------------------------


async def test_stop_closes_idle_connections_at_once_and_lets_a_request_in_flight_finish(autojump_clock) -> None:
    inside = trio.Event()

    async def app(scope, receive, send) -> None:
        await read_body(receive)
        if scope["path"] == "/slow":
            inside.set()
            await trio.sleep(3)
        await respond(send, scope["path"].encode())

    server = HttpServer(app, port=0, shutdown_grace=20)
    returned = trio.Event()
    with guard():
        async with trio.open_nursery() as nursery:
            async def run(task_status: trio.TaskStatus[list[str]]) -> None:
                await server.run(task_status=task_status)
                returned.set()

            port = int((await nursery.start(run))[0].rsplit(":", 1)[1])
            idle = await Client.connect(port)
            await idle.request()
            busy = await Client.connect(port)
            await busy.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
            await inside.wait()
            stopped_at = trio.current_time()
            server.stop()
            assert await idle.rest() == b""
            idle_closed = trio.current_time() - stopped_at
            r = await busy.response()
            answered = trio.current_time() - stopped_at
            assert await busy.rest() == b""
            await returned.wait()
            took = trio.current_time() - stopped_at
            with pytest.raises(OSError):
                await Client.connect(port)
    assert idle_closed == 0 and answered == 3 and took == 3  # at once; when the request ended, not the grace
    assert r.body == b"/slow" and r.headers["connection"] == "close"


async def test_stop_cancels_a_request_still_running_after_shutdown_grace(autojump_clock) -> None:
    inside = trio.Event()
    cancelled = []

    async def app(scope, receive, send) -> None:
        inside.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    server = HttpServer(app, port=0, shutdown_grace=20)
    with guard():
        async with trio.open_nursery() as nursery:
            port = int((await nursery.start(server.run))[0].rsplit(":", 1)[1])
            client = await Client.connect(port)
            await client.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            await inside.wait()
            start = trio.current_time()
            server.stop()
        took = trio.current_time() - start  # the nursery only exits once run() returned
    assert cancelled == [True] and took == 20
    assert await client.rest() == b""
