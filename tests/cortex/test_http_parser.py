"""The request parser, held against h11: the same heads and bodies get the same verdicts,
except where the parser is stricter on purpose (listed in :mod:`.parser`)."""

from __future__ import annotations

import random

import h11
import pytest

from helexa.roles.cortex.http.errors import RemoteProtocolError
from helexa.roles.cortex.http.parser import ChunkedBody, LengthBody, find_head_end, parse_head

AGREED = [
    b"GET / HTTP/1.1\r\nhost: t\r\n\r\n",
    b"GET / HTTP/1.1\nhost: t\n\n",
    b"GET / HTTP/1.1\r\nhost: t\n\r\n",
    b"POST /v1/chat/completions?x=1&y=%20 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nhost: t\r\n\r\n",
    b"GET http://example.com/a HTTP/1.1\r\nhost: example.com\r\n\r\n",
    b"M-SEARCH! /x HTTP/1.1\r\nhost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nx-empty:\r\nx-tabs:\t a \t b\t \r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nx-obs-text: caf\xc3\xa9 \xff\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 5, 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: Chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 00000000000000000007\r\n\r\n",
    # malformed
    b"\r\nGET / HTTP/1.1\r\nhost: t\r\n\r\n",
    b"\x00\x01\x02 not http at all\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost : t\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\n: empty name\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nx na: me\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nx-ctl: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\nx-cr: a\rb\r\n\r\n",
    b"G(T / HTTP/1.1\r\nhost: t\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nhost: t\r\n\r\n",
    b"GET  / HTTP/1.1\r\nhost: t\r\n\r\n",
    b"GET / http/1.1\r\nhost: t\r\n\r\n",
    b"GET /\r\nhost: t\r\n\r\n",
    b"GET / HTTP/1.1 \r\nhost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: twelve\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 123456789012345678901\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 5, 6\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
]

STRICTER = [  # h11 accepts these; the parser refuses them (see its module docstring)
    (b"GET / HTTP/1.1\r\nhost: t\r\nx-fold: a\r\n  b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nhost: t\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\n\r\n", 505),
]


def h11_verdict(head: bytes) -> tuple[int, object]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint, None
    assert isinstance(event, h11.Request), event
    return 200, (event.method, event.target, event.http_version, list(event.headers))


def our_verdict(head: bytes) -> tuple[int, object]:
    try:
        end = find_head_end(head)
        assert end == len(head)
        request, *_ = parse_head(head[:end])
    except RemoteProtocolError as exc:
        return exc.status, None
    return 200, (request.method, request.target, request.http_version, request.headers)


@pytest.mark.parametrize("head", AGREED)
def test_a_head_gets_the_same_verdict_and_fields_as_from_h11(head: bytes) -> None:
    assert our_verdict(head) == h11_verdict(head)


@pytest.mark.parametrize(("head", "status"), STRICTER)
def test_where_h11_is_lenient_the_parser_refuses(head: bytes, status: int) -> None:
    assert h11_verdict(head)[0] == 200 and our_verdict(head)[0] == status


def test_the_framing_of_a_head_is_read_from_its_headers() -> None:
    def framing(head: bytes) -> tuple:
        return parse_head(head)[1:]

    assert framing(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 12\r\n\r\n") == (12, True, False)
    assert framing(b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n") == (None, True, False)
    assert framing(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: keep-alive, close\r\n\r\n") == (0, False, False)
    assert framing(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: closed\r\n\r\n") == (0, True, False)
    assert framing(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n") == (0, False, False)
    assert framing(b"POST / HTTP/1.1\r\nhost: t\r\nexpect: 100-Continue\r\n\r\n") == (0, True, True)
    assert framing(b"POST / HTTP/1.0\r\nexpect: 100-continue\r\n\r\n") == (0, False, False)


def test_the_end_of_a_head_is_found_across_pieces_and_garbage_is_refused_at_its_first_byte() -> None:
    head = b"GET / HTTP/1.1\r\nhost: t\r\n\r\nrest"
    assert find_head_end(head) == len(head) - 4
    for cut in range(1, len(head) - 4):
        assert find_head_end(head[:cut], max(cut - 3, 0)) == -1
    assert find_head_end(head, len(head) - 10) == len(head) - 4
    with pytest.raises(RemoteProtocolError):
        find_head_end(b" GET")


def h11_body(framing: list[tuple[str, str]], pieces: list[bytes]) -> tuple[bytes, bool] | int:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nhost: t\r\n" + b"".join(b"%s: %s\r\n" % (n.encode(), v.encode())
                                                                     for n, v in framing) + b"\r\n")
    conn.next_event()
    body = b""
    try:
        for piece in pieces:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.EndOfMessage):
                    return body, True
                body += event.data
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint
    return body, False


def our_body(reader, pieces: list[bytes]) -> tuple[bytes, bool] | int:  # noqa: ANN001
    body, buf = b"", b""
    try:
        for piece in pieces:
            buf += piece
            while True:
                data, used, done = reader.feed(buf)
                buf = buf[used:]
                body += data
                if done:
                    return body, True
                if not data:
                    break
    except RemoteProtocolError as exc:
        return exc.status
    return body, False


def split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def test_chunked_bodies_decode_as_with_h11_however_they_are_split() -> None:
    rng = random.Random(7)
    for _ in range(300):
        chunks = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(0, 4))]
        wire = b"".join(b"%x%s\r\n%s\r\n" % (len(c), rng.choice([b"", b";a=b", b" "]), c) for c in chunks)
        wire += b"0\r\n" + rng.choice([b"", b"x-t: 1\r\n", b"a: b\r\nc: d\r\n"]) + b"\r\n"
        if rng.random() < 0.3:  # break it somewhere
            at = rng.randrange(len(wire))
            wire = wire[:at] + rng.choice([b"X", b"\n", b"\r", b"zz\r\n"]) + wire[at + 1:]
        pieces = split(wire, rng)
        assert our_body(ChunkedBody(), pieces) == h11_body([("transfer-encoding", "chunked")], pieces), wire


def test_a_length_body_takes_exactly_its_length() -> None:
    reader = LengthBody(5)
    assert reader.feed(b"abc") == (b"abc", 3, False)
    assert reader.feed(b"deGET /") == (b"de", 2, True)
    assert LengthBody(0).feed(b"GET") == (b"", 0, True)


def test_chunked_limits_hold() -> None:
    with pytest.raises(RemoteProtocolError, match="too long"):
        ChunkedBody().feed(b"1" * 5000)
    with pytest.raises(RemoteProtocolError) as caught:
        ChunkedBody(max_trailers=10).feed(b"0\r\nx-long: " + b"a" * 20)
    assert caught.value.status == 431
