"""A lean HTTP/1.1 server for the gateway's ASGI app, on trio and h11.

Why not hypercorn on the hot path: on this 2-core machine (server on one core, ``wrk`` on
the other, a trivial JSON POST answered with a fixed body), hypercorn's trio worker served
2,270 requests/s at concurrency 1 (p50 0.42 ms), and a plain trio + h11 loop 8,330/s
(p50 0.11 ms). Hypercorn spends the difference per request on a task and a memory channel
for the app, a restarted idle-timeout task, a send lock and one write for the head and one
for the body. That 0.3 ms is most of what separated the gateway from its latency and
throughput targets, so the gateway is served by this module by default (``gateway.server =
"helexa"``); ``"hypercorn"`` stays available (HTTP/2, and its wider feature set). The app
is plain ASGI either way. Both parse HTTP/1.1 with h11.

What it does:

* keep-alive, ``Expect: 100-continue``, chunked request bodies, chunked streamed
  responses, HEAD;
* one task per connection, and the app runs in it (HTTP/1.1 answers one request at a
  time per connection), so a request costs no task of its own;
* ``receive()`` after the body returns ``http.disconnect`` when the client closes the
  connection (it waits for that by peeking at the socket, never consuming a pipelined
  request) or once the response is complete, as hypercorn does;
* ``send()`` on a closed connection raises :class:`ClientDisconnected` (an ``OSError``,
  as the ASGI spec asks); a whole response sent at once is written in one ``send``;
* deadlines: a keep-alive connection idle for ``keep_alive_timeout`` is closed, a request
  head must arrive whole within ``read_timeout`` of its first byte, and each part of a
  body within ``read_timeout`` of the one before, a client must accept each write
  within ``send_timeout``;
* malformed HTTP gets 400 and the connection is closed; an app that fails before it
  answered gets a 500 (the traceback goes to the log, never to the client); the body of
  both comes from ``error_body`` (the gateway renders OpenAI's envelope there);
* :meth:`HttpServer.stop`: stop accepting, close idle connections at once, give requests
  in flight ``shutdown_grace`` seconds, then cancel them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

log = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

_MAX_RECV = 65536
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_DISCONNECT = {"type": "http.disconnect"}


class ClientDisconnected(OSError):
    """``send()`` was called after the client went away."""


ErrorBody = Callable[[int, str], tuple[bytes, bytes]]
"""``(status, message) -> (content type, body)`` of a response the server makes itself."""


def plain_error(status: int, message: str) -> tuple[bytes, bytes]:
    """The default :data:`ErrorBody`: one line of text."""
    return b"text/plain; charset=utf-8", f"{status} {_REASONS.get(status, b'').decode()}: {message}\n".encode()


def _error_response(render: ErrorBody, status: int, message: str) -> bytes:
    content_type, body = render(status, message)
    return (b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS.get(status, b""), content_type, len(body))) + body


class _Clock:
    """The ``date`` header, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class HttpServer:
    """Serve ``app`` (ASGI 3, HTTP only) on ``host:port`` (see the module docstring).

    Args:
        app: the ASGI callable.
        host, port: where to listen (port 0 picks a free port).
        keep_alive_timeout: seconds an idle keep-alive connection is kept.
        keep_alive_max_requests: requests served on one connection before it is closed.
        read_timeout: seconds a client may take to send a request head, or between parts
            of its body.
        send_timeout: seconds a client may take to accept one write.
        shutdown_grace: seconds requests in flight get after :meth:`stop`.
        max_header_bytes: the largest request head accepted.
        error_body: renders the responses the server makes itself (malformed HTTP, an app
            that failed before answering); the gateway passes its OpenAI envelope.
    """

    def __init__(self, app: App, *, host: str = "127.0.0.1", port: int = 0, keep_alive_timeout: float = 75.0,
                 keep_alive_max_requests: int = 100_000, read_timeout: float = 30.0, send_timeout: float = 60.0,
                 shutdown_grace: float = 10.0, max_header_bytes: int = 65536,
                 error_body: ErrorBody = plain_error) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.keep_alive_timeout = keep_alive_timeout
        self.keep_alive_max_requests = keep_alive_max_requests
        self.read_timeout = read_timeout
        self.send_timeout = send_timeout
        self.shutdown_grace = shutdown_grace
        self.max_header_bytes = max_header_bytes
        self.error_body = error_body
        self.clock = _Clock()
        self.closing = False
        self._stop = trio.Event()
        self._connections: set[_Connection] = set()

    def stop(self) -> None:
        """Begin the graceful shutdown (see the module docstring); :meth:`run` returns when done."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; reports the bound URLs (``["http://127.0.0.1:8080"]``)."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        binds = []
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            binds.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(self._serve, listeners, nursery)
                task_status.started(binds)
                await self._stop.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self.closing = True
            for conn in list(self._connections):
                if conn.idle:
                    conn.scope.cancel()
            with trio.move_on_after(self.shutdown_grace):
                while any(not c.idle for c in self._connections):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    async def _serve(self, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
        await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(self, stream)
        self._connections.add(conn)
        try:
            with conn.scope:
                await conn.serve()
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("HTTP connection from %s failed", conn.client)
        finally:
            self._connections.discard(conn)
            await trio.aclose_forcefully(stream)


class _Connection:
    """One client connection: reads requests with h11 and runs the app for each."""

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_header_bytes)
        self.scope = trio.CancelScope()
        self.idle = True
        self.served = 0
        self.head_deadline: float | None = None
        try:
            self.client: tuple[str, int] | None = stream.socket.getpeername()[:2]
            self.local: tuple[str, int] | None = stream.socket.getsockname()[:2]
        except OSError:
            self.client = self.local = None

    async def serve(self) -> None:
        while True:
            try:
                event = await self.next_event(idle=True)
            except h11.RemoteProtocolError as exc:
                await self.write_raw(_error_response(self.server.error_body, exc.error_status_hint,
                                                     f"malformed HTTP request: {exc}"))
                return
            except _ReadTimeout:
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed, or the client sent more after a Connection: close
            self.idle = False
            self.served += 1
            exchange = _Exchange(self, event)
            try:
                await exchange.run()
            finally:
                self.idle = True
            if exchange.reusable and self.h11.their_state is h11.SEND_BODY:
                self.skip_buffered_body()
            if (not exchange.reusable or not exchange.finished or self.server.closing
                    or self.h11.their_state is not h11.DONE):
                return
            # The response went out without h11 (see _Exchange._head): a fresh parser takes
            # over, with whatever the client already sent of its next request.
            leftover, closed = self.h11.trailing_data
            self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.server.max_header_bytes)
            if leftover:
                self.h11.receive_data(leftover)
            if closed:
                return

    def skip_buffered_body(self) -> None:
        """Consume what already arrived of a request body the app left unread.

        An app answering a GET never calls ``receive()``, so h11 has not yet seen the
        request end even though it is buffered; without this every such request would
        close its keep-alive connection. A body still to come is not waited for: the
        connection is closed instead.
        """
        try:
            while self.h11.their_state is h11.SEND_BODY:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    return
        except h11.RemoteProtocolError:
            return

    async def next_event(self, *, idle: bool = False) -> Any:
        """The next h11 event, reading the socket as needed under a deadline."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                self.head_deadline = None
                return event
            waiting = idle and self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]
            if waiting:
                timeout = self.server.keep_alive_timeout
            elif idle:  # a request head has begun: all of it within read_timeout, however it trickles
                if self.head_deadline is None:
                    self.head_deadline = trio.current_time() + self.server.read_timeout
                timeout = self.head_deadline - trio.current_time()
            else:
                timeout = self.server.read_timeout
            data = None
            with trio.move_on_after(timeout):
                try:
                    data = await self.stream.receive_some(_MAX_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
            if data is None:
                raise _ReadTimeout()
            self.h11.receive_data(data)

    async def write_raw(self, data: bytes) -> None:
        with trio.move_on_after(self.server.send_timeout):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


class _ReadTimeout(Exception):
    pass


class _Exchange:
    """One request and its response: the ``receive`` and ``send`` the app gets."""

    def __init__(self, conn: _Connection, request: h11.Request) -> None:
        self.conn = conn
        self.request = request
        self.head_request = request.method == b"HEAD"
        self.body_done = False
        self.stash: Any = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False  # the app sent http.response.start
        self.head_sent = False
        self.finished = False
        self.disconnected = False
        self.bad_request: str | None = None
        self.reusable = True
        self.watch: trio.CancelScope | None = None
        self.ended = trio.Event()
        self.chunked = False
        self.keep_alive = request.http_version == b"1.1" and not any(
            name == b"connection" and b"close" in value.lower() for name, value in request.headers)

    def asgi_scope(self) -> dict[str, Any]:
        req = self.request
        path, _, query = req.target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.http_version.decode(),
            "method": req.method.decode(),
            "scheme": "http",
            "path": unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(req.headers),
            "client": self.conn.client,
            "server": self.conn.local,
        }

    async def run(self) -> None:
        server = self.conn.server
        failed = False
        try:
            await server.app(self.asgi_scope(), self.receive, self.send)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("the app failed on %s %s", self.request.method.decode(), self.request.target.decode())
            failed = True
        self._end()
        if self.finished:
            return
        self.reusable = False
        # Exactly one fallback response, and only if no response head went out.
        if self.head_sent:
            return
        if self.bad_request is not None:
            await self.conn.write_raw(_error_response(server.error_body, 400,
                                                      f"malformed HTTP request: {self.bad_request}"))
        elif not self.disconnected:
            message = "internal error" if failed else "the app sent no response"
            await self.conn.write_raw(_error_response(server.error_body, 500, message))

    def _end(self) -> None:
        self.ended.set()
        if self.watch is not None:
            self.watch.cancel()

    # --- receive ------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if not self.body_done:
            try:
                return await self._body()
            except h11.RemoteProtocolError as exc:
                self.bad_request = str(exc)
            except _ReadTimeout:
                self.bad_request = f"the body did not arrive within {self.conn.server.read_timeout:g}s"
            self.body_done = self.disconnected = True
            return dict(_DISCONNECT)
        return await self._until_disconnect()

    async def _event(self) -> Any:
        if self.stash is not None:
            event, self.stash = self.stash, None
            return event
        h = self.conn.h11
        if h.they_are_waiting_for_100_continue and h.our_state is h11.SEND_RESPONSE:
            await self.conn.write_raw(h.send(h11.InformationalResponse(status_code=100, headers=[])))
        return await self.conn.next_event()

    async def _body(self) -> dict[str, Any]:
        event = await self._event()
        if isinstance(event, h11.Data):
            body = bytes(event.data)
            nxt = self.conn.h11.next_event()
            if isinstance(nxt, h11.EndOfMessage):
                self.body_done = True
                return {"type": "http.request", "body": body, "more_body": False}
            if nxt is not h11.NEED_DATA:
                self.stash = nxt
            return {"type": "http.request", "body": body, "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self.body_done = self.disconnected = True  # ConnectionClosed mid-body
        return dict(_DISCONNECT)

    async def _until_disconnect(self) -> dict[str, Any]:
        """Wait for the client to close the connection, or for the response to end."""
        if self.disconnected or self.ended.is_set():
            return dict(_DISCONNECT)
        if self.watch is not None:  # someone is already watching the socket
            await self.ended.wait()
            return dict(_DISCONNECT)
        self.watch = trio.CancelScope()
        with self.watch:
            try:
                peek = await self.conn.stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if not peek:
                self.disconnected = True
                self._end()
            else:
                await self.ended.wait()  # a pipelined request: it waits its turn
        return dict(_DISCONNECT)

    # --- send ---------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        if self.finished:
            raise RuntimeError("http.response.body after the response ended")
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        data = self._head(len(body), more) if not self.head_sent else b""
        if body and not self.head_request and self.status not in (204, 304):
            data += b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body
        if not more:
            if self.chunked:
                data += b"0\r\n\r\n"
            self.finished = True
        if data:
            await self._write(data)
        if not more:
            self._end()

    def _head(self, length: int, more: bool) -> bytes:
        """The status line and headers, framed by hand: h11's event objects and header
        validation cost ~10% of the cortex's CPU per request; requests are still parsed by
        h11, and a fresh parser takes over after each response (``_Connection.serve``)."""
        self.head_sent = True
        lines = [b"HTTP/1.1 %d %b\r\n" % (self.status, _REASONS.get(self.status, b""))]
        has_length = False
        for name, value in self.headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise RuntimeError(f"header {name!r} holds a line break")
            if name.lower() == b"content-length":
                has_length = True
            lines.append(b"%b: %b\r\n" % (name, value))
        if not has_length:
            if not more:
                lines.append(b"content-length: %d\r\n" % length)
            elif self.request.http_version == b"1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # an HTTP/1.0 stream ends when the connection does
        server = self.conn.server
        if server.closing or self.conn.served >= server.keep_alive_max_requests:
            self.keep_alive = False
        if not self.keep_alive:
            self.reusable = False
            lines.append(b"connection: close\r\n")
        lines.append(b"date: %b\r\n\r\n" % server.clock.date())
        return b"".join(lines)

    async def _write(self, data: bytes) -> None:
        error: BaseException | None = None
        try:
            # Most writes fit in the socket's buffer: write them straight to the non-blocking
            # socket, and go through trio (a pass through its scheduler) only for the rest.
            try:
                sent = os.write(self.conn.fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                with trio.move_on_after(self.conn.server.send_timeout) as scope:  # cheaper than fail_after
                    await self.conn.stream.send_all(memoryview(data)[sent:])
                if scope.cancelled_caught:
                    error = trio.TooSlowError(f"a write took over {self.conn.server.send_timeout:g}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            error = exc
        if error is not None:
            self.disconnected = True
            self.reusable = False
            self._end()
            raise ClientDisconnected(f"the client is gone: {error or type(error).__name__}")
