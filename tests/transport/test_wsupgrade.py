"""The server side of the websocket opening handshake, sans-IO: fed the request wsproto's
client writes (trio-websocket's, the neuron's), and the answers read back by it."""

from __future__ import annotations

import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request

from helexa.transport import wsupgrade
from helexa.transport.wsupgrade import UpgradeRejected, accept, head_end, parse_upgrade, reject

GOOD = (b"GET / HTTP/1.1\r\nHost: cortex:7000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_wsprotos_client_request_is_accepted_and_it_accepts_the_answer() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    wire = ws.send(Request(host="cortex:7000", target="/", extensions=[]))
    end = head_end(wire)
    assert end == len(wire)
    key = parse_upgrade(wire[:end])
    ws.receive_data(accept(key))
    assert [type(e) for e in ws.events()] == [AcceptConnection]


def test_the_accept_digest_is_the_rfcs_example() -> None:
    # RFC 6455 1.3: key "dGhlIHNhbXBsZSBub25jZQ==" -> "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".
    assert parse_upgrade(GOOD) == "dGhlIHNhbXBsZSBub25jZQ=="
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in accept("dGhlIHNhbXBsZSBub25jZQ==")


def test_an_offered_extension_is_not_agreed_and_the_client_still_accepts() -> None:
    from wsproto.extensions import PerMessageDeflate

    ws = WSConnection(ConnectionType.CLIENT)
    wire = ws.send(Request(host="cortex", target="/", extensions=[PerMessageDeflate()]))
    ws.receive_data(accept(parse_upgrade(wire)))
    (event,) = list(ws.events())
    assert isinstance(event, AcceptConnection) and event.extensions == []


def test_header_names_are_case_insensitive_and_tokens_are_lists() -> None:
    head = GOOD.replace(b"Connection: Upgrade", b"connection: keep-alive, UPGRADE").replace(b"Upgrade: websocket",
                                                                                          b"UPGRADE: WebSocket")
    assert parse_upgrade(head) == "dGhlIHNhbXBsZSBub25jZQ=="


def test_the_head_ends_at_the_blank_line_and_a_long_one_is_431() -> None:
    assert head_end(GOOD[:-2]) == -1
    assert head_end(GOOD + b"\x82\x80") == len(GOOD)
    with pytest.raises(UpgradeRejected) as exc:
        head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * wsupgrade.MAX_HEAD)
    assert exc.value.status == 431


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (GOOD.replace(b"GET", b"POST"), 405),
        (GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
        (GOOD.replace(b"GET / HTTP/1.1", b"GET /"), 400),
        (GOOD.replace(b"Host: cortex:7000\r\n", b""), 400),
        (GOOD.replace(b"Upgrade: websocket", b"Upgrade: h2c"), 400),
        (GOOD.replace(b"Connection: Upgrade", b"Connection: close"), 400),
        (GOOD.replace(b"Version: 13", b"Version: 8"), 426),
        (GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"), 400),
        (GOOD.replace(b"Host: cortex", b"Host : cortex"), 400),
        (GOOD.replace(b"Host: cortex:7000", b"no colon here"), 400),
    ],
    ids=["post", "http10", "no-version", "no-host", "not-websocket", "no-connection-upgrade", "version-8",
         "bad-key", "space-before-colon", "no-colon"],
)
def test_a_request_that_is_not_a_valid_upgrade_gets_its_status(head: bytes, status: int) -> None:
    with pytest.raises(UpgradeRejected) as exc:
        parse_upgrade(head)
    assert exc.value.status == status


def test_a_refusal_is_a_complete_http_answer_the_client_reads_as_a_rejection() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    ws.send(Request(host="cortex", target="/"))
    ws.receive_data(reject(503, retry_after=1))
    event, *body = list(ws.events())  # a RejectData with the (empty) body, if any, follows
    assert isinstance(event, RejectConnection) and event.status_code == 503
    assert (b"retry-after", b"1") in [(k.lower(), v) for k, v in event.headers]
    assert b"Sec-WebSocket-Version: 13\r\n" in reject(426, "version 13 only")
