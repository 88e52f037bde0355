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
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any

import trio

from helexa.transport.accept_errors import serve_listener

from .connection import Connection, ErrorBody, plain_error
from .errors import ClientGone
from .events import NEED_DATA, Request
from .exchange import AsgiExchange
from .read_sweep import ReadSweep
from .states import State

log = logging.getLogger(__name__)

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

_MAX_RECV = 65536




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
        self.exchange: AsgiExchange | None = None
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
            exchange = self.exchange = AsgiExchange(self, event)
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
            return await self._read_ready()
        return None

    async def _read_ready(self) -> bytes:
        """Wait until the socket is readable and read (``b""``: the client closed)."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                return os.read(self.fd, _MAX_RECV)
            except BlockingIOError:
                continue  # woken with nothing to read after all
            except OSError:
                return b""

    async def _wait_swept(self, deadline: float) -> bytes:
        sweep = self.server.sweep
        self.due = deadline
        sweep.add(self)
        try:
            return await self._read_ready()
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
