"""The server side of a websocket connection, sans-IO: fed the bytes wsproto's client
writes (what trio-websocket, the neuron's client, sends), synchronously."""

from __future__ import annotations

import os

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping as WsPing, Pong as WsPong, TextMessage
from wsproto.frame_protocol import CloseReason

from helexa.transport import wsframes
from helexa.transport.wsframes import (
    CloseReceived,
    FrameError,
    LocalError,
    Message,
    Ping,
    Pong,
    ServerConnection,
    State,
    unmask,
)


def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def events(conn: ServerConnection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def masked(payload: bytes, opcode: int = wsframes.BINARY, *, fin: bool = True, key: bytes = b"\x01\x02\x03\x04",
           rsv: int = 0) -> bytes:
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | rsv | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return head + key + unmask(payload, key)


def test_unmask_is_its_own_inverse_and_matches_the_rfc_example() -> None:
    # RFC 6455 5.7: "Hello" masked with 37 fa 21 3d.
    assert unmask(bytes.fromhex("7f9f4d5158"), bytes.fromhex("37fa213d")) == b"Hello"
    for n in (0, 1, 3, 4, 5, 127, 65537):
        data, key = os.urandom(n), os.urandom(4)
        assert unmask(unmask(data, key), key) == data


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_messages_of_every_length_encoding_arrive_whole(size: int) -> None:
    conn, ws = ServerConnection(1 << 20), client()
    payload = os.urandom(size)
    conn.receive_data(ws.send(BytesMessage(payload)))
    assert events(conn) == [Message(payload)]


def test_bytes_fed_one_at_a_time_make_the_same_events() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    wire = ws.send(BytesMessage(b"a" * 300)) + ws.send(WsPing(b"p")) + ws.send(BytesMessage(b"bc"))
    out = []
    for i in range(len(wire)):
        conn.receive_data(wire[i:i + 1])
        out += events(conn)
    assert out == [Message(b"a" * 300), Ping(b"p"), Message(b"bc")]


def test_a_fragmented_message_is_joined_and_control_frames_may_come_between() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    wire = (ws.send(BytesMessage(b"one ", message_finished=False)) + ws.send(WsPing(b"x"))
            + ws.send(BytesMessage(b"two ", message_finished=False)) + ws.send(BytesMessage(b"three")))
    conn.receive_data(wire)
    assert events(conn) == [Ping(b"x"), Message(b"one two three")]


def test_text_frames_are_reported_as_text() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    conn.receive_data(ws.send(TextMessage("hé")))
    assert events(conn) == [Message("hé".encode(), text=True)]


def test_ping_and_pong_come_out_with_their_payloads_and_a_pong_answers() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    conn.receive_data(ws.send(WsPing(b"abc")) + ws.send(WsPong(b"def")))
    assert events(conn) == [Ping(b"abc"), Pong(b"def")]
    ws.receive_data(conn.pong(b"abc"))
    assert [type(e).__name__ for e in ws.events()] == ["Pong"]


def test_a_message_over_the_limit_is_refused_from_its_header_with_1009() -> None:
    conn, ws = ServerConnection(1000), client()
    wire = ws.send(BytesMessage(b"x" * 1001))
    conn.receive_data(wire[:10])  # the header alone says it is too big
    with pytest.raises(FrameError) as exc:
        conn.next_event()
    assert exc.value.code == 1009


def test_fragments_that_add_up_over_the_limit_are_refused_with_1009() -> None:
    conn, ws = ServerConnection(1000), client()
    conn.receive_data(ws.send(BytesMessage(b"x" * 600, message_finished=False)))
    assert events(conn) == []
    conn.receive_data(ws.send(BytesMessage(b"x" * 600)))
    with pytest.raises(FrameError) as exc:
        conn.next_event()
    assert exc.value.code == 1009


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"\x82\x03abc", "must be masked"),
        (masked(b"abc", rsv=0x40), "reserved bits"),
        (masked(b"abc", 0x3), "unknown opcode"),
        (masked(b"abc", wsframes.CONTINUATION), "continuation"),
        (masked(b"x" * 126, wsframes.PING), "control frame"),
        (masked(b"x", wsframes.PING, fin=False), "control frame"),
        (masked(b"a", fin=False) + masked(b"b"), "before the last one was finished"),
        (masked(b"\x03"), None),  # a fine one-byte message, for contrast
        (masked(b"\x03", wsframes.CLOSE), "one-byte"),
    ],
)
def test_frames_that_break_rfc_6455_raise_a_protocol_error(wire: bytes, why: str | None) -> None:
    conn = ServerConnection(1 << 20)
    conn.receive_data(wire)
    if why is None:
        assert events(conn) == [Message(b"\x03")]
        return
    with pytest.raises(FrameError, match=why) as exc:
        events(conn)
    assert exc.value.code == 1002


def test_a_close_reason_that_is_not_utf8_is_1007() -> None:
    conn = ServerConnection(1 << 20)
    conn.receive_data(masked(b"\x03\xe8\xff", wsframes.CLOSE))
    with pytest.raises(FrameError) as exc:
        conn.next_event()
    assert exc.value.code == 1007


def test_the_client_closing_first_is_answered_and_then_nothing_more_is_read() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    conn.receive_data(ws.send(CloseConnection(1001, "bye")) + masked(b"late"))
    assert events(conn) == [CloseReceived(1001, "bye")]
    assert conn.state is State.CLOSE_RECEIVED
    ws.receive_data(conn.close(1001))
    assert conn.state is State.CLOSED
    (event,) = list(ws.events())
    assert isinstance(event, CloseConnection) and event.code == 1001


def test_a_close_without_a_code_reports_1005() -> None:
    conn = ServerConnection(1 << 20)
    conn.receive_data(masked(b"", wsframes.CLOSE))
    assert events(conn) == [CloseReceived(1005, "")]


def test_the_server_closing_first_reads_on_until_the_clients_close() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    in_flight = ws.send(BytesMessage(b"in flight"))  # sent before the client read our Close
    ws.receive_data(conn.close(1008, "unauthorized"))
    assert conn.state is State.CLOSE_SENT
    (event,) = list(ws.events())
    assert isinstance(event, CloseConnection) and event.code == 1008 and event.reason == "unauthorized"
    conn.receive_data(in_flight + ws.send(event.response()))
    assert events(conn) == [Message(b"in flight"), CloseReceived(1008, "unauthorized")]
    assert conn.state is State.CLOSED
    with pytest.raises(LocalError):
        conn.message(b"too late")
    with pytest.raises(LocalError):
        conn.close()


def test_a_long_close_reason_is_cut_to_fit_a_control_frame_on_a_character_boundary() -> None:
    conn, ws = ServerConnection(1 << 20), client()
    ws.receive_data(conn.close(1000, "é" * 100))
    (event,) = list(ws.events())
    assert event.reason == "é" * 61 and event.code == CloseReason.NORMAL_CLOSURE


@pytest.mark.parametrize("size", [0, 125, 126, 65536])
def test_server_messages_are_read_by_wsprotos_client(size: int) -> None:
    conn, ws = ServerConnection(1 << 20), client()
    payload = os.urandom(size)
    ws.receive_data(conn.message(payload))
    (event,) = list(ws.events())
    assert isinstance(event, BytesMessage) and event.data == payload and event.message_finished
