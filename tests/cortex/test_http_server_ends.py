"""How a request or connection of the lean HTTP/1.1 server ends, over real sockets on
127.0.0.1 with a raw TCP client (:mod:`raw_http`): the client going away (seen by
``receive`` and ``send``), the server's deadlines (keep-alive, a head or body that stops
arriving, a client that stops reading) and its shutdown.

Nothing here waits for wall-clock time: steps are ordered by events and
``wait_all_tasks_blocked``, and the deadlines run on trio's autojump clock (loopback
delivers bytes within the ``send`` call, so a read never waits on the clock) and are
asserted to the exact virtual second.
"""

from __future__ import annotations

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from helexa.roles.cortex.http import ClientGone, HttpServer
from raw_http import Client, echo, guard, read_body, respond, serving


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
