"""Hypercorn's trio worker (TLS portals, and ``gateway.server = "hypercorn"``) held to the
lean server's limits on what a client may hold (:class:`.http.HttpServer`).

Hypercorn has no limit on connections open at once, cuts a request head sent slowly only
at ``keep_alive_timeout`` (its idle timer) and a TLS handshake at ``ssl_handshake_timeout``
(60 s), and its one read deadline (``read_timeout``) applies to every read, so it would cut
a long streamed answer whose client is silent while it listens. A slowloris could so take
every open file of the cortex through a TLS portal. Here:

* at most ``max_connections`` are open on one socket (TLS handshakes included): past it a
  new connection is closed at once, before its handshake, as the lean server does;
* a request head must arrive whole within ``head_timeout`` of its first byte, and a TLS
  handshake within ``head_timeout`` (hypercorn's ``ssl_handshake_timeout``); once a request
  is under way there is no read deadline (its body is read by the app within
  ``gateway.body_timeout``, :meth:`.asgi.Exchange.body`), so a streamed answer flows as
  long as it lasts. On HTTP/2 the same holds per stream (:mod:`.h2_guard`): the head
  deadline runs while a frame or a header block is unfinished, not on an idle
  connection's PING or SETTINGS, nor only while no stream runs;
* each write must be taken within ``send_timeout`` (hypercorn's write is shielded and had
  no deadline: a client that read nothing held its request and connection for good); past
  it the connection is closed, as on the lean server. On HTTP/2 a stream's answer must
  also find a flow-control window within it (:mod:`.h2_guard`);
* the idle timer (``keep_alive_timeout``) is restarted whatever cancels the task that ends
  a request (on HTTP/2 that task is the app's, which the stream's own ``http.disconnect``
  cancels; the timer was then never restarted and the connection stayed open for good);
* a failure of hypercorn's on one connection ends that connection, logged, not the server.

:func:`serve` is :func:`hypercorn.trio.serve` with the listener's handler wrapped: the same
sockets, TLS context, graceful stop (idle connections close, requests in flight get
``graceful_timeout``) and ``TCPServer``, whose read loop learns when a request is under way
from the protocol's own ``Updated`` events (HTTP/1.1), or from the frames the HTTP/2
connection holds unparsed (:class:`.h2_guard.H2Guard`). The gateway's app has nothing to
do at ASGI lifespan, so none is run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from helexa.transport.accept_errors import serve_listener

from .h2_guard import H2Guard

log = logging.getLogger("helexa.gateway.http")


class _GuardedTCPServer(TCPServer):
    """Hypercorn's connection, with a deadline on a request head (see the module docstring)."""

    head_timeout: float = 30.0
    send_timeout: float = 60.0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._busy = False
        self._head_due = math.inf
        self._h2: H2Guard | None = None

    def _guard(self) -> H2Guard | None:
        """The HTTP/2 deadlines, once the connection speaks HTTP/2 (ALPN, or a client's preface)."""
        protocol = self.protocol.protocol
        if isinstance(protocol, H2Protocol) and (self._h2 is None or self._h2.protocol is not protocol):
            self._h2 = H2Guard(protocol, self.head_timeout, self.send_timeout)
        return self._h2

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            await self._send_raw(event.data)
            return
        if not isinstance(event, Updated):
            await super().protocol_send(event)
            return
        if self._h2 is None:
            # A request began (idle=False: its head is in) or the last one ended: either
            # way no head is being waited for; the next bytes of an idle connection start one.
            self._busy = not event.idle
            self._head_due = math.inf
        # Shielded: an HTTP/2 stream's end reaches its app as http.disconnect, whose watch
        # cancels the app's task, the one sending this; a cancelled restart would leave the
        # connection with no idle timer, open for good.
        with trio.CancelScope(shield=True):
            await super().protocol_send(event)
            if event.idle and self._h2 is not None and self._h2.draining:
                await self.idle_task.restart(self._task_group, self._close_now)

    async def _send_raw(self, data: bytes) -> None:
        """Hypercorn's write, shielded from its caller's cancellation (a TLS record or frame
        cut in half would break the connection), with ``send_timeout`` of its own: a client
        that takes nothing for that long loses the connection, as on the lean server."""
        async with self.send_lock:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.send_timeout) as scope:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
                    return
            if scope.cancelled_caught:
                log.debug("HTTP connection: a write took over %gs: closed", self.send_timeout)
                await trio.aclose_forcefully(self.stream)
                with trio.CancelScope(shield=True):
                    await self.protocol.handle(Closed())

    async def _close_now(self) -> None:
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def _read_data(self) -> None:
        while True:
            with trio.move_on_at(self._head_due) as scope:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
            if scope.cancelled_caught:
                if self._h2 is not None and await self._h2.go_away():
                    self._head_due = math.inf  # the streams running end; then the connection closes
                    continue
                log.debug("HTTP connection: a request head took over %gs: closed", self.head_timeout)
                break
            guard = self._guard()
            if guard is None:
                if data and not self._busy and self._head_due == math.inf:
                    self._head_due = trio.current_time() + self.head_timeout
                await self.protocol.handle(RawData(bytes(data)))
            else:
                held = guard.buffered()
                await self.protocol.handle(RawData(bytes(data)))
                self._head_due = guard.head_due(trio.current_time(), held, len(data))
            if self._h2 is None and self._guard() is not None:  # a client's preface, over cleartext
                self._head_due = self._h2.head_due(trio.current_time(), 0, len(data))  # type: ignore[union-attr]
            if data == b"":
                break
        await self.protocol.handle(Closed())
        # Nothing more will be read: the keep-alive timer would otherwise hold the
        # connection (and its file) open until keep_alive_timeout after its client left.
        await self.idle_task.stop()


class _Cap:
    """Connections open on one socket, and those turned away past ``limit`` (0: none)."""

    def __init__(self, limit: int, where: str) -> None:
        self.limit = limit
        self.where = where
        self.open = 0
        self.turned_away = 0
        self._warned_at = -math.inf

    def turn_away(self) -> None:
        self.turned_away += 1
        now = trio.current_time()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("HTTP %s: %d connections open, the limit (gateway.max_connections): new ones are closed "
                        "at once (%d so far)", self.where, self.open, self.turned_away)


async def serve(app: Any, config: Config, *, max_connections: int, head_timeout: float, send_timeout: float,
                shutdown_trigger: Callable[[], Awaitable[Any]],
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` (ASGI 3) as ``config`` says until ``shutdown_trigger`` returns, then stop
    gracefully; reports the bound URLs through ``task_status``. ``max_connections``: 0 for
    no limit. ``config.ssl_handshake_timeout`` is set to ``head_timeout``."""
    config.set_statsd_logger_class(StatsdLogger)
    config.ssl_handshake_timeout = head_timeout
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    server_class = type("GuardedTCPServer", (_GuardedTCPServer,),
                        {"head_timeout": head_timeout, "send_timeout": send_timeout})
    sockets = config.create_sockets()
    ssl_context = config.create_ssl_context()
    listeners: list[trio.abc.Listener[Any]] = []
    binds: list[str] = []
    for secure, group in ((True, sockets.secure_sockets), (False, sockets.insecure_sockets)):
        for sock in group:
            sock.listen(config.backlog)
            listener: trio.abc.Listener[Any] = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            if secure:
                listener = trio.SSLListener(listener, ssl_context, https_compatible=True)  # type: ignore[arg-type]
            listeners.append(listener)
            binds.append(f"{'https' if secure else 'http'}://{repr_socket_addr(sock.family, sock.getsockname())}")

    async def handle(cap: _Cap, stream: Any) -> None:
        if cap.limit and cap.open >= cap.limit:
            cap.turn_away()
            # Closed before any TLS is spoken: the plain socket under an SSLStream.
            await trio.aclose_forcefully(getattr(stream, "transport_stream", stream))
            return
        cap.open += 1
        try:
            await server_class(wrapped, config, context, ConnectionState({}), stream).run()
        except Exception:  # hypercorn's own failure on one connection: that connection only, not the server
            log.exception("HTTP %s: a connection failed in hypercorn; closed", cap.where)
        finally:
            cap.open -= 1

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            for listener, bind in zip(listeners, binds, strict=True):
                cap = _Cap(max_connections, bind)
                accepting.start_soon(serve_listener, partial(handle, cap), listener, f"HTTP {bind}", connections)
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        # Idle connections close now (their idle timer waits on this); requests in flight
        # get graceful_timeout, as in hypercorn's worker.
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
