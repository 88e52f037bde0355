"""The HTTP connection's state machine fed by hand, for its tests (``test_http_connection*.py``):
requests written as bytes, answers made as an app makes them, and what the server wrote read
back with h11 as a strict client would read it."""

from __future__ import annotations

import h11

from helexa.roles.cortex.http.connection import Connection
from helexa.roles.cortex.http.events import Request, Sentinel
from helexa.roles.cortex.http.states import State

DATE = b"Mon, 30 Nov 2026 00:00:00 GMT"
GET = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


def make(**options) -> Connection:
    options.setdefault("keep_alive_timeout", 75.0)
    options.setdefault("read_timeout", 30.0)
    return Connection(date=lambda: DATE, **options)


def post(body: bytes, headers: bytes = b"", *, length: int | None = None) -> bytes:
    """A POST of ``body``, announcing ``length`` bytes (``len(body)`` by default)."""
    length = len(body) if length is None else length
    return b"POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n%b\r\n%b" % (length, headers, body)


def read(conn: Connection, data: bytes = b"", now: float = 0.0) -> list:
    """Feed ``data``, then every event up to and including the first sentinel."""
    if data:
        conn.receive_data(data, now)
    events = []
    while not isinstance(event := conn.next_event(now), Sentinel):
        events.append(event)
    return [*events, event]


def head(conn: Connection, data: bytes, now: float = 0.0) -> Request:
    """Feed ``data`` and take the request, as the shell does before the app asks for the body."""
    conn.receive_data(data, now)
    request = conn.next_event(now)
    assert type(request) is Request
    return request


def states(conn: Connection) -> tuple[State, State]:
    return conn.client_state, conn.server_state


def answer(conn: Connection, body: bytes = b"ok", *, status: int = 200, headers=(), parts=()) -> bytes:
    """What an app does: start, stream ``parts``, end with ``body``; returns the bytes to write."""
    conn.start_response(status, list(headers))
    for part in parts:
        conn.send_body(part, True)
    conn.send_body(body, False)
    return conn.data_to_send()


def responses(data: bytes, *methods: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Read ``data`` as h11 does, as the answers to requests with ``methods`` (GET)."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    out = []
    for method in methods or (b"GET",):
        if client.our_state is h11.DONE:
            client.start_next_cycle()
        client.send(h11.Request(method=method, target="/", headers=[("host", "t")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(b"")  # close-delimited: the connection's end is the body's
                continue
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        out.append((status, headers, body))
    return out
