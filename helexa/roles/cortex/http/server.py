"""The trio shell around :class:`.Connection`: it accepts, reads and writes, and runs the
app; every decision about HTTP is the connection's.

One task per connection, and the app runs in it (HTTP/1.1 answers one request at a time
per connection), so a request costs no task of its own. Reads wait no later than the
connection's :attr:`~.Connection.deadline`; when it passes the connection is told
(:meth:`~.Connection.timeout`). A read between requests (an idle keep-alive connection, a
head that has not arrived whole) has its deadline kept by the server's :class:`.ReadSweep`,
at most ``read_timeout / 20`` (and 0.5 s) late, rather than by a cancel scope of its own; a
read of a body the app waits for keeps its scope. Writes go straight to the non-blocking socket
(``os.write``) and only what does not fit goes through trio, under ``send_timeout``.

The app is plain ASGI 3 (HTTP only):

* ``receive()`` hands out the body, then returns ``http.disconnect`` once the client
  closes the connection (noticed by peeking at the socket, which never consumes a
  pipelined request) or once the response is complete, as hypercorn does;
* ``send()`` on a connection whose client went away raises :class:`.ClientGone` (an
  ``OSError``, as the ASGI spec asks); a response sent whole goes out in one write;
* an app that raises before it answered gets a 500 from the connection (the traceback
  goes to the log, never to the client).

:meth:`HttpServer.stop` stops accepting, closes idle connections at once, gives requests
in flight ``shutdown_grace`` seconds (it waits for the last connection to end, not for a
poll), then cancels them.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import trio

from helexa.transport.accept_errors import serve_listener

from .connection import Connection, ErrorBody, plain_error
from .errors import ClientGone, LocalProtocolError
from .events import NEED_DATA, Data, Request
from .parser import BoundedMemo
from .read_sweep import ReadSweep
from .states import State

log = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

_MAX_RECV = 65536


_METHODS = BoundedMemo(bytes.decode, limit=64, longest=16,
                       seed=(b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"))
"""``_METHODS[b"POST"]`` is ``"POST"``: a request method as the ASGI scope's string."""
_DISCONNECT = {"type": "http.disconnect"}

BODY_EXTENSION = "helexa.body"
"""The ASGI scope's ``extensions`` key under which a request's whole body is given when
it came with the head: the app may take it from there rather than through ``receive()``
(which still hands it out too), and so wait for nothing and need no deadline for it."""

CANCEL_EXTENSION = "helexa.cancel_scope"
"""The ASGI scope's ``extensions`` key of the connection's ``trio.CancelScope``, around the
app's call: an app that learns the client went away may cancel it rather than open a scope
of its own per request (the request ends, and so does the connection, which has nobody
left to answer)."""


class _Clock:
    """The ``Date`` header, formatted once a second."""

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
        host: the address to listen on.
        port: the port (0 picks a free one).
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
                 error_body: ErrorBody = plain_error, max_connections: int = 0) -> None:
        self.app = app
        self.max_connections = max_connections
        self.turned_away = 0
        """Connections closed at accept because :attr:`max_connections` were open."""
        self._warned_at = -math.inf
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
        """True once :meth:`stop` was called and the listeners are closed."""
        self._stop = trio.Event()
        self._drained = trio.Event()
        self._connections: set[_ServerConnection] = set()
        self.sweep = ReadSweep(min(0.5, read_timeout / 20, keep_alive_timeout / 20))
        """Keeps the deadlines of the reads between requests (see the module docstring)."""

    def stop(self) -> None:
        """Begin the graceful shutdown (see the module docstring); :meth:`run` returns when done."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`.

        Reports the bound URLs through ``task_status`` (``["http://127.0.0.1:8080"]``).

        Raises:
            OSError: the address could not be bound.
        """
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        binds = []
        for listener in listeners:
            host, port = listener.socket.getsockname()[:2]
            binds.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sweep.run)
            async with trio.open_nursery() as accepting:
                for listener, bind in zip(listeners, binds, strict=True):
                    # (a failed accept, the open-file limit reached, is said once a minute)
                    accepting.start_soon(serve_listener, self._serve, listener, f"HTTP {bind}", nursery)
                task_status.started(binds)
                await self._stop.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self.closing = True
            for conn in list(self._connections):
                conn.shutdown()
            if not self._connections:
                self._drained.set()
            with trio.move_on_after(self.shutdown_grace):
                await self._drained.wait()
            nursery.cancel_scope.cancel()

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self.max_connections and len(self._connections) >= self.max_connections:
            self._turn_away()
            await trio.aclose_forcefully(stream)
            return
        conn = _ServerConnection(self, stream)
        self._connections.add(conn)
        try:
            with conn.scope:
                if self.closing:
                    conn.shutdown()
                await conn.serve()
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("HTTP connection from %s failed", conn.client)
        finally:
            self._connections.discard(conn)
            if self.closing and not self._connections:
                self._drained.set()
            await trio.aclose_forcefully(stream)

    def _turn_away(self) -> None:
        self.turned_away += 1
        now = trio.current_time()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("HTTP %s:%s: %d connections open, the limit (gateway.max_connections): new ones are closed "
                        "at once (%d so far)", self.host, self.port, len(self._connections), self.turned_away)


class _ServerConnection:
    """One client connection: moves bytes between its socket and its :class:`.Connection`."""

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.protocol = Connection(keep_alive_timeout=server.keep_alive_timeout, read_timeout=server.read_timeout,
                                   max_requests=server.keep_alive_max_requests,
                                   max_head_bytes=server.max_header_bytes, error_body=server.error_body,
                                   date=server.clock.date)
        self.scope = trio.CancelScope()
        self.due = math.inf
        """While a read between requests waits: its deadline, which the server's sweep keeps
        (:meth:`expire`); otherwise ``math.inf``."""
        self.exchange: _Exchange | None = None
        self.now = trio.lowlevel.current_clock().current_time
        """The run's clock (``trio.current_time()`` is four Python calls, this two)."""
        self._yields: int | None = -1  # the task's count of yields to the scheduler at its last read
        self._target = b""  # the last request target, and what the ASGI scope makes of it
        self._path: tuple[str, bytes, bytes] = ("", b"", b"")
        try:
            self.client: tuple[str, int] | None = stream.socket.getpeername()[:2]
            self.local: tuple[str, int] | None = stream.socket.getsockname()[:2]
        except OSError:
            self.client = self.local = None

    def shutdown(self) -> None:
        """The server is stopping: an idle connection closes now (its task is in a read)."""
        if self.protocol.shutdown():
            self.scope.cancel()

    def expire(self, now: float) -> None:
        """The server's sweep: the deadline of this connection's read between requests has
        passed. The connection is told (it closes without a word: an idle one, or a head
        that did not arrive whole) and its task's wait is cancelled. Bytes that came just
        as it passed, when the task has already been woken for them, are dropped by the
        closed connection, and no app is called."""
        self.due = math.inf
        self.protocol.timeout(now)
        self.scope.cancel()

    async def serve(self) -> None:
        protocol = self.protocol
        while True:
            event = await self.next_event()
            if type(event) is not Request:
                return  # CLOSED
            exchange = self.exchange = _Exchange(self, event)
            if protocol.client_state is State.BODY:
                exchange.body = protocol.whole_body()
            failed = False
            try:
                await self.server.app(exchange.asgi_scope(), exchange.receive, exchange.send)
            except ClientGone:
                pass
            except Exception:
                log.exception("the app failed on %s %s", event.method.decode(), event.target.decode("latin-1"))
                failed = True
            self.exchange = None
            exchange.end()
            protocol.app_returned(failed)
            if protocol.out:  # (an answer made for the app, or nothing: usually nothing)
                await self.write_quietly(protocol.data_to_send())

    async def next_event(self) -> Any:
        """The connection's next event other than NEED_DATA, reading as it asks."""
        protocol = self.protocol
        clock = self.now
        now = clock()  # read again only after a read or a write
        while True:
            event = protocol.next_event(now)
            if protocol.out:
                await self.write_quietly(protocol.data_to_send())
                now = clock()
            if event is not NEED_DATA:
                return event
            data = await self.read(protocol.deadline, swept=self.exchange is None)
            now = clock()
            if data is None:
                protocol.timeout(now)
            else:
                protocol.receive_data(data, now)

    async def read(self, deadline: float | None, *, swept: bool = False) -> bytes | None:
        """The next bytes from the client (``b""``: it closed, or the read failed), or
        ``None`` when ``deadline`` passed first.

        Under load the bytes are usually there already (a keep-alive client's next
        request, a body sent behind its head): they are read straight from the
        non-blocking socket, and only a read that would block waits, in a cancel scope for
        the deadline; a ``swept`` read (between requests) waits in none, its deadline kept
        by the server's sweep (:meth:`expire`). Scopes and trio's socket wrapper were a
        measured share of a request's CPU: docs/benchmarks.md, issue 17 item 2."""
        try:
            data = os.read(self.fd, _MAX_RECV)
        except BlockingIOError:
            pass
        except OSError:
            return b""
        else:
            # A client that keeps bytes coming must not starve the others: every pass of the
            # serve loop yields to the scheduler at least once. Most passes already did (a
            # request that went to a neuron waited for its answer); then this read only
            # checks for cancellation, which saves a pass through trio's scheduler per
            # request (docs/benchmarks.md, issue 17 item 2).
            # (task._schedule_points: trio's own count of a task's yields, which it keeps for
            # trio.testing.assert_checkpoints; tests/cortex/test_http_server.py checks it. A
            # trio without it gives None here, and every read yields as it used to.)
            task = trio.lowlevel.current_task()
            if getattr(task, "_schedule_points", None) == self._yields:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            self._yields = getattr(task, "_schedule_points", None)
            return data
        if swept:
            return await self._wait_swept(math.inf if deadline is None else deadline)
        with trio.move_on_at(math.inf if deadline is None else deadline):
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    return os.read(self.fd, _MAX_RECV)
                except BlockingIOError:
                    continue  # woken with nothing to read after all
                except OSError:
                    return b""
        return None

    async def _wait_swept(self, deadline: float) -> bytes:
        sweep = self.server.sweep
        self.due = deadline
        sweep.add(self)
        try:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    return os.read(self.fd, _MAX_RECV)
                except BlockingIOError:
                    continue  # woken with nothing to read after all
                except OSError:
                    return b""
        finally:
            self.due = math.inf
            sweep.discard(self)

    async def write(self, data: bytes) -> None:
        """Write ``data`` to the client.

        Raises:
            ClientGone: the client is gone, or did not take the data within ``send_timeout``
                (the connection is told: it will not be reused).
        """
        error: BaseException | None = None
        try:
            # Most writes fit in the socket's buffer: write them straight to the non-blocking
            # socket, and go through trio (a pass through its scheduler) only for the rest.
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                with trio.move_on_after(self.server.send_timeout) as scope:  # cheaper than fail_after
                    await self.stream.send_all(memoryview(data)[sent:])
                if scope.cancelled_caught:
                    error = trio.TooSlowError(f"a write took over {self.server.send_timeout:g}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            error = exc
        if error is not None:
            self.protocol.send_failed()
            raise ClientGone(f"the client is gone: {error or type(error).__name__}")

    async def write_quietly(self, data: bytes) -> None:
        """Write what the server says on its own (nobody to tell if the client is gone)."""
        try:
            await self.write(data)
        except ClientGone:
            pass


class _Exchange:
    """One request and its response: the ``receive`` and ``send`` the app gets."""

    __slots__ = ("conn", "request", "ended", "_ended_event", "watch", "body")

    def __init__(self, conn: _ServerConnection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.body: bytes | None = None
        """The whole body, when it came with the head (until ``receive()`` hands it out)."""
        self.ended = False
        """Whether ``http.disconnect`` is due: the response is complete, the client left,
        or the app returned."""
        self._ended_event: trio.Event | None = None  # made only for a receive() that waits for the end
        self.watch: trio.CancelScope | None = None

    def asgi_scope(self) -> dict[str, Any]:
        req = self.request
        conn = self.conn
        target = req.target
        if target == conn._target:  # a keep-alive client asks for the same path again and again
            path, raw_path, query = conn._path
        else:
            raw_path, _, query = target.partition(b"?")
            path = raw_path.decode("latin-1")
            if "%" in path:
                path = unquote(path)
            conn._target, conn._path = target, (path, raw_path, query)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if req.http_version == b"1.1" else req.http_version.decode(),
            "method": _METHODS[req.method],
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": conn.client,
            "server": conn.local,
        }
        extensions: dict[str, Any] = {CANCEL_EXTENSION: conn.scope}
        if self.body is not None:
            extensions[BODY_EXTENSION] = self.body
        scope["extensions"] = extensions
        return scope

    def end(self) -> None:
        self.ended = True
        if self._ended_event is not None:
            self._ended_event.set()
        if self.watch is not None:
            self.watch.cancel()

    async def _wait_ended(self) -> None:
        if self.ended:
            await trio.lowlevel.checkpoint()
            return
        if self._ended_event is None:
            self._ended_event = trio.Event()
        await self._ended_event.wait()

    async def receive(self) -> dict[str, Any]:
        """ASGI ``receive``: the body's parts, then ``http.disconnect`` when it is due."""
        conn = self.conn
        if conn.exchange is not self or self.ended:
            return dict(_DISCONNECT)
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        if conn.protocol.client_state is State.BODY:
            event = await conn.next_event()
            if type(event) is Data:
                return {"type": "http.request", "body": event.body, "more_body": event.more}
            return dict(_DISCONNECT)  # the client left mid-body, or its body was malformed or late
        if not conn.protocol.exchange_open:
            return dict(_DISCONNECT)
        if self.watch is not None:  # a task is already watching the socket
            await self._wait_ended()
            return dict(_DISCONNECT)
        self.watch = trio.CancelScope()
        with self.watch:
            try:
                peek = await conn.stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if peek:
                await self._wait_ended()  # a pipelined request: it waits its turn
            else:
                conn.protocol.receive_data(b"", conn.now())
                self.end()
        return dict(_DISCONNECT)

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI ``send``.

        Raises:
            ClientGone: the client went away (see :meth:`.Connection.send_body`).
            LocalProtocolError: a message out of order, of an unknown type, or after the
                app returned.
        """
        conn = self.conn
        if conn.exchange is not self:
            raise LocalProtocolError("send() after the app returned")
        kind = message["type"]
        if kind == "http.response.body":
            protocol = conn.protocol
            try:
                # (`in` and subscripts rather than .get: no method call per message)
                protocol.send_body(message["body"] if "body" in message else b"",
                                   "more_body" in message and message["more_body"])
                data = protocol.data_to_send()
                if data:
                    await conn.write(data)
            except ClientGone:
                self.end()
                raise
            if protocol.server_state is State.DONE:
                self.end()
        elif kind == "http.response.start":
            conn.protocol.start_response(message["status"], list(message["headers"]) if "headers" in message else [])
        else:
            raise LocalProtocolError(f"unexpected ASGI message {kind!r}")
