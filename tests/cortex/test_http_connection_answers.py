"""The HTTP connection's state machine, driven synchronously (see ``test_http_connection.py``,
whose last test takes these tests too): deadlines as timer events, responses, what the app
did, and shutdown.
"""

from __future__ import annotations

import pytest

from helexa.roles.cortex.http.states import State
from helexa.roles.cortex.http.errors import ClientGone, LocalProtocolError
from helexa.roles.cortex.http.events import CLOSED, NEED_DATA, Data
from http_wire import DATE, GET, answer, head, make, post, read, responses, states


# --- deadlines, as timer events --------------------------------------------------------------


def test_an_idle_connection_closes_at_keep_alive_timeout_and_not_before() -> None:
    conn = make(keep_alive_timeout=5.0)
    assert read(conn, now=10.0) == [NEED_DATA] and conn.deadline == 15.0
    assert read(conn, now=12.0) == [NEED_DATA] and conn.deadline == 15.0  # asking again does not move it
    conn.timeout(14.9)
    assert conn.client_state is State.IDLE  # early: nothing
    conn.timeout(15.0)
    assert states(conn) == (State.CLOSED, State.CLOSED) and conn.deadline is None and conn.data_to_send() == b""


def test_a_head_must_arrive_whole_within_read_timeout_of_its_first_byte() -> None:
    conn = make(read_timeout=3.0)
    read(conn, now=0.0)
    for i, byte in enumerate(b"GET / HTTP/1.1\r\n"):  # a byte a second: each in time, the head not
        assert read(conn, bytes([byte]), now=10.0 + i) == [NEED_DATA]
        assert conn.deadline == 13.0
        conn.timeout(10.0 + i)
        if conn.client_state is not State.HEAD:
            break
    assert states(conn) == (State.CLOSED, State.CLOSED) and conn.data_to_send() == b""


def test_a_body_that_stops_arriving_ends_with_a_408_after_read_timeout() -> None:
    conn = make(read_timeout=2.0)
    assert read(conn, post(b"abc", length=10), now=1.0)[1:] == [
        Data(b"abc", True), NEED_DATA]
    assert conn.deadline == 3.0
    assert read(conn, b"de", now=2.5) == [Data(b"de", True), NEED_DATA] and conn.deadline == 4.5  # each part restarts it
    conn.timeout(4.5)
    assert read(conn) == [CLOSED] and conn.client_state is State.ERROR
    conn.app_returned()
    (status, _, body), = responses(conn.data_to_send())
    assert status == 408 and b"the body did not arrive within 2s" in body
    assert states(conn) == (State.CLOSED, State.CLOSED)


def test_the_body_deadline_runs_only_while_the_app_waits_for_the_body() -> None:
    conn = make(read_timeout=2.0)
    head(conn, b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\n", now=0.0)
    assert conn.deadline is None  # handed out; the app has not asked for the body yet
    assert read(conn, now=50.0) == [NEED_DATA] and conn.deadline == 52.0


# --- responses ------------------------------------------------------------------------------


def test_a_streamed_response_is_chunked_and_the_connection_stays() -> None:
    conn = make()
    read(conn, GET)
    conn.start_response(200, [(b"content-type", b"text/event-stream")])
    assert conn.server_state is State.HEAD_HELD and conn.data_to_send() == b""  # held for the first part
    conn.send_body(b"one ", True)
    head = conn.data_to_send()
    assert b"transfer-encoding: chunked\r\n" in head and head.endswith(b"\r\n\r\n4\r\none \r\n")
    conn.send_body(b"", True)  # an empty part writes nothing
    assert conn.data_to_send() == b"" and conn.server_state is State.SEND_BODY
    conn.send_body(b"two", True)
    conn.send_body(b"", False)
    assert conn.data_to_send() == b"3\r\ntwo\r\n0\r\n\r\n"
    assert responses(head + b"3\r\ntwo\r\n0\r\n\r\n")[0][2] == b"one two"
    conn.app_returned()
    assert states(conn) == (State.IDLE, State.IDLE)


def test_head_gets_the_headers_and_no_body_even_when_streamed() -> None:
    for parts in ((), (b"a",)):
        conn = make()
        read(conn, b"HEAD / HTTP/1.1\r\nhost: t\r\n\r\n")
        out = answer(conn, b"hello", headers=[(b"content-length", b"5")], parts=parts)
        assert out.endswith(b"\r\n\r\n") and b"hello" not in out
        assert responses(out, b"HEAD") == [
            (200, {b"content-length": b"5", b"date": DATE}, b"")]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_carry_no_body_and_no_content_length(status: int) -> None:
    conn = make()
    read(conn, GET)
    out = answer(conn, b"ignored", status=status)
    assert b"content-length" not in out and out.endswith(b"\r\n\r\n")
    conn.app_returned()
    assert conn.server_state is State.IDLE


def test_the_apps_own_content_length_is_kept_and_its_connection_header_decides_nothing_else() -> None:
    conn = make()
    read(conn, GET)
    out = answer(conn, b"abc", headers=[(b"Content-Length", b"3"), (b"connection", b"keep-alive")])
    assert out.lower().count(b"content-length") == 1 and b"connection" not in out
    conn.app_returned()
    read(conn, GET)
    assert b"connection: close\r\n" in answer(conn, headers=[(b"Connection", b"close")])
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED)


def test_sends_out_of_order_are_refused() -> None:
    conn = make()
    with pytest.raises(LocalProtocolError, match="no request"):
        conn.start_response(200, [])
    read(conn, GET)
    with pytest.raises(LocalProtocolError, match="before http.response.start"):
        conn.send_body(b"x", False)
    conn.start_response(200, [(b"x-bad", b"a\r\nset-cookie: 1")])
    with pytest.raises(LocalProtocolError, match="line break"):
        conn.send_body(b"x", False)
    conn = make()
    read(conn, GET)
    answer(conn)
    with pytest.raises(LocalProtocolError, match="sent twice"):
        conn.start_response(200, [])
    with pytest.raises(LocalProtocolError, match="after the response ended"):
        conn.send_body(b"x", False)


# --- what the app did -----------------------------------------------------------------------


@pytest.mark.parametrize(("started", "failed", "says"), [
    (False, False, b"the app sent no response"),
    (False, True, b"internal error"),
    (True, False, b"the app sent no response"),
])
def test_an_app_that_returned_without_answering_gets_one_500(started: bool, failed: bool, says: bytes) -> None:
    conn = make()
    read(conn, GET + GET)
    if started:
        conn.start_response(200, [])
    conn.app_returned(failed=failed)
    (status, headers, body), = responses(conn.data_to_send())
    assert status == 500 and says in body and headers[b"connection"] == b"close"
    assert states(conn) == (State.CLOSED, State.CLOSED) and conn.data_to_send() == b""


def test_an_app_that_failed_after_the_head_went_out_only_closes_the_connection() -> None:
    conn = make()
    read(conn, GET + GET)
    conn.start_response(200, [])
    conn.send_body(b"partial", True)
    conn.data_to_send()
    conn.app_returned(failed=True)
    assert conn.data_to_send() == b"" and states(conn) == (State.CLOSED, State.CLOSED)  # no second response


def test_send_to_a_client_that_went_away_raises_client_gone_and_nothing_is_answered() -> None:
    conn = make()
    read(conn, GET)
    assert conn.exchange_open
    conn.receive_data(b"", 1.0)  # the shell saw the socket end while the app was working
    assert not conn.exchange_open and conn.client_state is State.CLOSED
    conn.start_response(200, [])
    with pytest.raises(ClientGone) as caught:
        conn.send_body(b"late", False)
    assert isinstance(caught.value, OSError)
    conn.app_returned()
    assert conn.data_to_send() == b"" and states(conn) == (State.CLOSED, State.CLOSED)


def test_a_failed_write_marks_the_client_gone() -> None:
    conn = make()
    read(conn, GET)
    conn.start_response(200, [])
    conn.send_body(b"a", True)
    conn.data_to_send()
    conn.send_failed()
    with pytest.raises(ClientGone):
        conn.send_body(b"b", True)
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED)


# --- shutdown -------------------------------------------------------------------------------


def test_shutdown_closes_an_idle_connection_at_once() -> None:
    idle = make()
    assert read(idle) == [NEED_DATA]
    assert idle.shutdown() and states(idle) == (State.CLOSED, State.CLOSED) and idle.deadline is None
    half = make()
    read(half, b"GET / HTTP/1.1\r\n")
    assert half.shutdown() and states(half) == (State.CLOSED, State.CLOSED)


def test_shutdown_during_a_request_closes_after_its_response_which_says_so() -> None:
    conn = make()
    read(conn, GET + GET)
    assert not conn.shutdown() and conn.server_state is State.SEND_RESPONSE
    assert b"connection: close\r\n" in answer(conn)
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED)  # the pipelined request is not served
