"""The HTTP connection's state machine, driven synchronously: no trio, no sockets, no clock.

Bytes go in with :meth:`Connection.receive_data`, time passes only as the ``now`` given
to it; what the server writes is read back with h11 as a strict client would read it
(:mod:`http_wire`). Here: keep-alive and pipelining, request bodies and heads; deadlines,
responses, what the app did and shutdown are in ``test_http_connection_answers.py``. The
last test checks that the tests of both, together, take every transition of the table.
"""

from __future__ import annotations

import pytest

from helexa.roles.cortex.http.connection import Connection, plain_error
from helexa.roles.cortex.http.states import TRANSITIONS, State
from helexa.roles.cortex.http.errors import ClientGone
from helexa.roles.cortex.http.events import CLOSED, NEED_DATA, PAUSED, Data, Request
from http_wire import DATE, GET, answer, head, make, post, read, responses, states
import test_http_connection_answers as answers_tests


# --- keep-alive and pipelining -------------------------------------------------------------


def test_a_request_without_a_body_is_handed_out_with_one_empty_last_part() -> None:
    conn = make()
    request, data, paused = read(conn, b"GET /v1/models?x=1 HTTP/1.1\r\nHost: t\r\nX-A:  b \r\n\r\n")
    assert request == Request(b"GET", b"/v1/models?x=1", b"1.1", [(b"host", b"t"), (b"x-a", b"b")])
    assert data == Data(b"", False) and paused is PAUSED
    assert states(conn) == (State.DONE, State.SEND_RESPONSE) and conn.exchange_open


def test_a_response_sent_whole_gets_a_content_length_and_the_connection_serves_the_next() -> None:
    conn = make()
    read(conn, GET)
    out = answer(conn, b"hello", headers=[(b"content-type", b"text/plain")])
    assert out == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\ndate: " + DATE
                   + b"\r\n\r\nhello")
    assert states(conn) == (State.DONE, State.DONE) and not conn.exchange_open
    conn.app_returned()
    assert states(conn) == (State.IDLE, State.IDLE) and conn.keep_alive
    assert read(conn, now=5.0) == [NEED_DATA] and conn.deadline == 5.0 + 75.0
    assert read(conn, GET, now=6.0)[0].method == b"GET" and conn.served == 2


def test_pipelined_requests_wait_behind_the_current_one() -> None:
    conn = make()
    first, body, paused = read(conn, post(b"one") + post(b"two") + b"GET /thr")
    assert (first.target, body, paused) == (b"/p", Data(b"one", False), PAUSED)
    assert conn.next_event(1.0) is PAUSED  # however often it is asked
    answer(conn, b"1")
    assert conn.next_event(1.0) is PAUSED  # until the app has returned
    conn.app_returned()
    second, body, paused = read(conn, now=2.0)
    assert body == Data(b"two", False) and paused is PAUSED
    answer(conn, b"2")
    conn.app_returned()
    assert read(conn, now=3.0) == [NEED_DATA]
    assert states(conn) == (State.HEAD, State.IDLE) and conn.deadline == 3.0 + 30.0  # from when it was taken up
    assert read(conn, b"ee HTTP/1.1\r\nhost: t\r\n\r\n", now=4.0)[0].target == b"/three"


def test_connection_close_from_the_client_closes_after_the_response_which_says_so() -> None:
    conn = make()
    read(conn, b"GET / HTTP/1.1\r\nhost: t\r\nconnection: Keep-Alive, Close\r\n\r\n")
    (status, headers, _), = responses(answer(conn))
    assert status == 200 and headers[b"connection"] == b"close"
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED) and read(conn) == [CLOSED]


def test_http_1_0_gets_no_keep_alive_and_its_streamed_response_ends_with_the_connection() -> None:
    conn = make()
    request, *_ = read(conn, b"GET / HTTP/1.0\r\n\r\n")  # no Host needed in 1.0
    assert request.http_version == b"1.0"
    out = answer(conn, b"c", parts=[b"a", b"b"])
    assert b"transfer-encoding" not in out and b"content-length" not in out and out.endswith(b"\r\n\r\nabc")
    assert responses(out) == [(200, {b"connection": b"close", b"date": DATE}, b"abc")]
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED)


def test_the_request_limit_closes_the_connection_after_its_last_response() -> None:
    conn = make(max_requests=2)
    read(conn, GET)
    assert b"connection" not in answer(conn)
    conn.app_returned()
    read(conn, GET)
    assert b"connection: close\r\n" in answer(conn)
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED)


def test_a_client_closing_an_idle_connection_ends_it_quietly() -> None:
    conn = make()
    read(conn, GET)
    answer(conn)
    conn.app_returned()
    conn.receive_data(b"", 1.0)
    assert states(conn) == (State.CLOSED, State.CLOSED) and conn.data_to_send() == b"" and read(conn) == [CLOSED]


# --- request bodies ------------------------------------------------------------------------


def test_a_body_arriving_in_parts_is_handed_out_in_parts() -> None:
    conn = make()
    assert read(conn, b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\n\r\nhello")[1:] == [
        Data(b"hello", True), NEED_DATA]
    assert read(conn, b" world") == [Data(b" world", False), PAUSED]
    assert states(conn) == (State.DONE, State.SEND_RESPONSE)


def test_a_body_that_came_with_its_head_is_had_whole_and_only_then() -> None:
    conn = make()
    head(conn, post(b"hello") + GET)
    assert conn.whole_body() == b"hello" and conn.client_state is State.DONE
    assert read(conn) == [PAUSED]  # the next request waits its turn, as after a Data
    partial = make()
    head(partial, post(b"hel", length=5))
    assert partial.whole_body() is None and read(partial) == [Data(b"hel", True), NEED_DATA]
    waiting = make()  # a client waiting for 100 Continue is not told to go on by the look
    head(waiting, post(b"", b"expect: 100-continue\r\n", length=5))
    assert waiting.whole_body() is None and waiting.data_to_send() == b"" and waiting.deadline is None
    chunked = make()
    head(chunked, b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    assert chunked.whole_body() is None and read(chunked) == [Data(b"", False), PAUSED]


def test_a_chunked_body_is_decoded_and_its_extensions_and_trailers_dropped() -> None:
    conn = make()
    head = b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
    assert read(conn, head + b"5;ext=1\r\nhello\r\n")[1:] == [Data(b"hello", True), NEED_DATA]
    assert read(conn, b"6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n" + GET) == [Data(b" world", False), PAUSED]
    answer(conn)
    conn.app_returned()
    assert read(conn)[0].target == b"/"  # the next request, right behind the trailers


def test_a_chunked_body_split_at_every_byte_decodes_the_same() -> None:
    conn = make()
    read(conn, b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
    body, last = b"", None
    for byte in b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n":
        for event in read(conn, bytes([byte])):
            if type(event) is Data:
                body, last = body + event.body, event
    assert body == b"abc0123456789abcdef" and last.more is False and conn.client_state is State.DONE


def test_a_malformed_chunk_ends_the_body_and_is_answered_400_once_the_app_returns() -> None:
    conn = make()
    events = read(conn, b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXY")
    assert events[1:] == [Data(b"abc", True), CLOSED] and conn.client_state is State.ERROR
    with pytest.raises(ClientGone):  # the app answers a request whose body failed: the 400 wins
        answer(conn)
    conn.app_returned()
    (status, headers, body), = responses(conn.data_to_send())
    assert status == 400 and headers[b"connection"] == b"close"
    assert body.startswith(b"400 Bad Request: malformed HTTP request: chunk not followed by CRLF")
    assert states(conn) == (State.CLOSED, State.CLOSED)


def test_expect_100_continue_is_answered_when_the_app_first_waits_for_the_body() -> None:
    conn = make()
    request, waiting = read(conn, post(b"", b"expect: 100-continue\r\n", length=5))
    assert waiting is NEED_DATA and conn.data_to_send() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert read(conn) == [NEED_DATA] and conn.data_to_send() == b""  # said once
    assert read(conn, b"hello") == [Data(b"hello", False), PAUSED]


def test_expect_100_continue_is_not_sent_after_the_response_began_or_once_the_body_is_here() -> None:
    started = make()
    head(started, b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
    started.start_response(413, [])
    started.send_body(b"", False)
    assert started.data_to_send().startswith(b"HTTP/1.1 413")
    assert read(started) == [NEED_DATA] and started.data_to_send() == b""  # the app reads after answering
    here = make()
    read(here, b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhel")
    assert read(here) == [NEED_DATA] and here.data_to_send() == b""


def test_a_body_the_app_left_unread_is_skipped_when_it_is_all_here() -> None:
    conn = make()
    head(conn, post(b"unread") + GET)  # the app answers without asking for the body
    answer(conn)
    conn.app_returned()
    assert states(conn) == (State.IDLE, State.IDLE) and read(conn)[0].target == b"/"


def test_a_body_the_app_left_unread_and_still_arriving_closes_the_connection() -> None:
    conn = make()
    assert conn.next_event(0.0) is NEED_DATA
    head(conn, b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\nabc")
    answer(conn, b"early")
    conn.app_returned()
    assert states(conn) == (State.CLOSED, State.CLOSED)


def test_a_client_gone_mid_body_gets_a_disconnect_and_no_answer() -> None:
    conn = make()
    read(conn, b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
    conn.receive_data(b"", 1.0)
    assert read(conn) == [CLOSED] and conn.client_state is State.CLOSED and conn.deadline is None
    conn.app_returned()
    assert conn.data_to_send() == b"" and states(conn) == (State.CLOSED, State.CLOSED)


# --- request heads -------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "status", "says"), [
    (b"\x00\x01\x02 not http at all\r\n\r\n", 400, b"illegal request line"),
    (b"GET / HTTP/1.1\r\nhost: t\r\nthis is no header\r\n\r\n", 400, b"illegal header line"),
    (b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: twelve\r\n\r\n", 400, b"bad Content-Length"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, b"missing Host header"),
    (b"GET / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n", 501, b"chunked is supported"),
    (b"GET / HTTP/2.0\r\nhost: t\r\n\r\n", 505, b"HTTP/2.0 is not supported"),
])
def test_a_malformed_head_gets_its_status_and_the_connection_closes(head: bytes, status: int, says: bytes) -> None:
    conn = make()
    assert read(conn, head) == [CLOSED]
    (got, headers, body), = responses(conn.data_to_send())
    assert got == status and headers[b"connection"] == b"close" and says in body
    assert body.startswith(b"%d " % status) and b"malformed HTTP request" in body
    assert states(conn) == (State.CLOSED, State.CLOSED) and conn.served == 0


@pytest.mark.parametrize("pieces", [1, 2])
def test_a_head_over_the_limit_gets_431_whether_it_ends_or_not(pieces: int) -> None:
    conn = make(max_head_bytes=100)
    head = b"GET / HTTP/1.1\r\nhost: t\r\nx-pad: " + b"a" * 120
    events = read(conn, head + b"\r\n\r\n") if pieces == 1 else read(conn, head)
    assert events == [CLOSED] and conn.data_to_send().startswith(b"HTTP/1.1 431 Request Header Fields Too Large")


def test_a_head_closed_midway_ends_quietly() -> None:
    conn = make()
    assert read(conn, b"GET / HT") == [NEED_DATA] and conn.client_state is State.HEAD
    conn.receive_data(b"", 1.0)
    assert states(conn) == (State.CLOSED, State.CLOSED) and conn.data_to_send() == b""


def test_the_renderer_given_writes_the_servers_own_answers() -> None:
    conn = Connection(error_body=lambda status, message, target: (b"application/json",
                                                                  b'{"m": "%b"}' % message.encode()))
    read(conn, b"\x00\r\n\r\n")
    out = conn.data_to_send()
    assert b"content-type: application/json\r\n" in out and out.endswith(b'{"m": "malformed HTTP request: illegal request line"}')
    assert plain_error(404, "x") == (b"text/plain; charset=utf-8", b"404 Not Found: x\n")


def test_the_renderer_is_told_the_requests_target_and_none_for_a_malformed_head_after_one() -> None:
    seen: list[bytes] = []

    def render(status: int, message: str, target: bytes) -> tuple[bytes, bytes]:
        seen.append(target)
        return b"text/plain", b"x"

    conn = Connection(error_body=render)
    assert read(conn, b"POST /api/chat HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc", now=1.0)[1:] == [
        Data(b"abc", True), NEED_DATA]
    conn.timeout(1.0 + conn.read_timeout)
    conn.app_returned()
    assert seen == [b"/api/chat"]
    conn = Connection(error_body=render)
    read(conn, b"GET /api/tags HTTP/1.1\r\nhost: t\r\n\r\n")
    answer(conn)
    conn.app_returned()
    read(conn, b"\x00\r\n\r\n")  # the next head on the connection is malformed
    assert seen == [b"/api/chat", b""]


# --- the table ------------------------------------------------------------------------------


def test_every_state_and_transition_of_the_table_is_exercised(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: set[tuple[str, State, object]] = set()
    fire = Connection._fire

    def recording(self: Connection, trigger) -> None:  # noqa: ANN001
        before = {"client": self.client_state, "server": self.server_state}
        fire(self, trigger)
        for role, moves in TRANSITIONS.items():
            if any(trigger in m for m in moves.values()):
                taken.add((role.value, before[role.value], trigger))

    monkeypatch.setattr(Connection, "_fire", recording)
    for name, test in [*globals().items(), *vars(answers_tests).items()]:
        if not name.startswith("test_") or test is test_every_state_and_transition_of_the_table_is_exercised:
            continue
        marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            test()
            continue
        names, values = marks[0].args
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        for value in values:
            test(**dict(zip(names, value if len(names) > 1 else (value,))))
    table = {(role.value, state, trigger) for role, moves in TRANSITIONS.items()
             for state, triggers in moves.items() for trigger in triggers}
    assert table - taken == set()
    assert {s for _, s, _ in taken} | {State.CLOSED} == set(State)


def test_the_header_name_memo_is_bounded() -> None:
    # A client inventing header names grows the memo to its bound and no further; long
    # names are lowered each time and never kept.
    from helexa.roles.cortex.http.parser import BoundedMemo

    memo = BoundedMemo(bytes.lower, limit=4, longest=8, seed=(b"Host",))
    assert [memo[n] for n in (b"A", b"B", b"C", b"D", b"E")] == [b"a", b"b", b"c", b"d", b"e"]
    assert len(memo) == 4 and b"E" not in memo
    assert memo[b"X" * 9] == b"x" * 9 and b"X" * 9 not in memo
