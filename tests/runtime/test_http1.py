"""The sans-IO HTTP/1.1 response reader: framing, keep-alive, and what it refuses."""

from __future__ import annotations

import pytest

from helexa.runtime import http1
from helexa.runtime.http1 import IncompleteResponse, ProtocolError, ResponseReader, State


def read_all(wire: bytes, *, pieces: int | None = None, eof: bool = False,
             head_request: bool = False) -> tuple[http1.Head, bytes, ResponseReader]:
    """Feed ``wire`` (in pieces of ``pieces`` bytes) and read one whole response."""
    reader = ResponseReader()
    reader.start(head_request=head_request)
    step = pieces or len(wire) or 1
    parts = [wire[i:i + step] for i in range(0, len(wire), step)]
    if eof:
        parts.append(b"")
    head, body = None, []
    for part in parts:
        reader.feed(part)
        if head is None:
            head = reader.head()
        if head is not None:
            while data := reader.body():
                body.append(data)
    assert head is not None, "no head"
    return head, b"".join(body), reader


CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n1;name=value\r\n \r\n6\r\nworld!\r\n0\r\nx-trailer: yes\r\n\r\n")


def test_a_content_length_body_is_read_whole_and_the_connection_is_reusable() -> None:
    head, body, reader = read_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  spaced  \r\n\r\nhello")
    assert (head.status, head.reason, body) == (200, "OK", b"hello")
    assert head.header("x-a") == "spaced" and head.header("content-length") == "5"
    assert reader.state is State.DONE and reader.reusable


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_a_chunked_body_is_decoded_however_the_bytes_are_split(step: int) -> None:
    head, body, reader = read_all(CHUNKED, pieces=step)
    assert body == b"hello world!"
    assert head.header("transfer-encoding") == "chunked"
    assert reader.state is State.DONE and reader.reusable


def test_two_responses_in_a_row_on_one_connection() -> None:
    reader = ResponseReader()
    for _ in range(2):
        reader.start()
        reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert reader.head().status == 204
        assert reader.body() == b"" and reader.state is State.DONE
    assert reader.reusable


def test_a_body_without_framing_lasts_until_the_connection_closes() -> None:
    head, body, reader = read_all(b"HTTP/1.1 200 OK\r\n\r\nall of it", eof=True)
    assert body == b"all of it" and reader.state is State.DONE
    assert not head.keep_alive and not reader.reusable


@pytest.mark.parametrize("wire", [b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n"])
def test_http_1_0_and_connection_close_are_not_reused(wire: bytes) -> None:
    _, _, reader = read_all(wire)
    assert reader.state is State.DONE and not reader.reusable


def test_interim_responses_are_skipped() -> None:
    head, body, _ = read_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert (head.status, body) == (200, b"ok")


def test_a_head_request_and_304_have_no_body() -> None:
    head, body, reader = read_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", head_request=True)
    assert body == b"" and reader.reusable
    head, body, reader = read_all(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n")
    assert head.status == 304 and body == b"" and reader.reusable


def test_bytes_after_a_response_make_the_connection_unusable() -> None:
    _, _, reader = read_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA")
    assert reader.state is State.DONE and not reader.reusable
    with pytest.raises(ProtocolError):
        reader.start()


def test_a_connection_that_ends_before_a_response_says_so() -> None:
    reader = ResponseReader()
    reader.start()
    reader.feed(b"")
    with pytest.raises(IncompleteResponse, match="before a response"):
        reader.head()
    assert not reader.received_any


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-",
], ids=["length", "chunk-data", "no-last-chunk", "head"])
def test_a_connection_that_ends_inside_a_response_is_incomplete(wire: bytes) -> None:
    with pytest.raises(IncompleteResponse):
        read_all(wire, eof=True)


@pytest.mark.parametrize("wire, message", [
    (b"HTTP/2 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nname : value\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nx: a\x00b\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", "conflicting"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n", "content-length"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n", "both"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "transfer-encoding"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x5\r\nhello\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXY0\r\n\r\n", "CRLF"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"1" * 2000, "too long"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched"),
], ids=["version", "status", "no-colon", "space-before-colon", "obs-fold", "nul", "two-lengths",
        "negative-length", "te-and-length", "gzip", "hex", "0x", "chunk-crlf", "chunk-line", "101"])
def test_malformed_responses_are_refused(wire: bytes, message: str) -> None:
    reader = ResponseReader()
    reader.start()
    reader.feed(wire)
    with pytest.raises(ProtocolError, match=message):
        if reader.head() is not None:
            while reader.state is not State.DONE:
                reader.body()
    assert reader.state is State.ERROR and not reader.reusable


def test_an_endless_head_is_refused() -> None:
    reader = ResponseReader()
    reader.start()
    reader.feed(b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"a" * (http1.MAX_HEAD + 10))
    with pytest.raises(ProtocolError, match="longer than"):
        reader.head()


def test_requests_are_framed_and_control_characters_refused() -> None:
    wire = http1.format_request("POST", "/v1/x", "h:1", (("content-type", "application/json"),), b"{}")
    assert wire == b"POST /v1/x HTTP/1.1\r\nhost: h:1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    assert http1.format_request("GET", "/health", "h") == b"GET /health HTTP/1.1\r\nhost: h\r\n\r\n"
    with pytest.raises(ValueError):
        http1.format_request("GET", "/", "h", (("authorization", "x\r\ninjected: yes"),))


def test_framing_headers_are_read_whatever_their_case_and_the_others_on_demand() -> None:
    """Only the framing headers are read when the head arrives; the others come whole,
    in order and lower-cased, when asked for."""
    head, body, reader = read_all(b"HTTP/1.1 200 OK\r\nDate: today\r\nCONTENT-LENGTH: 2\r\n"
                                  b"Connection: Close\r\nX-B:\tb \r\n\r\nhi", eof=True)
    assert body == b"hi" and not head.keep_alive and not reader.reusable
    assert head.headers == (("date", "today"), ("content-length", "2"), ("connection", "Close"), ("x-b", "b"))
    head, body, _ = read_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert body == b"hi"
    with pytest.raises(ProtocolError, match="conflicting content-length"):
        read_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nContent-Length: 3\r\n\r\nhi")
