"""A lean HTTP/1.1 client for one upstream server: pooled keep-alive connections on trio.

The ``openai_proxy`` backend talks to vLLM, llama.cpp's server or any OpenAI-style server
through an :class:`Upstream`. It does what that path needs and no more: no redirects,
cookies, proxies or per-request client set-up (httpx spent ~1 ms of the neuron's CPU per
request on those; see docs/benchmarks.md). The framing is :mod:`helexa.runtime.http1`.

* **Pooled connections.** Idle connections are kept (most recently used first) for
  ``idle_timeout`` seconds, less than the usual servers' keep-alive (uvicorn's and
  cpp-httplib's are 5 s). Before one is reused it is checked without blocking: one the
  server closed (or that holds bytes nobody asked for) is dropped. At most
  ``max_connections`` are open at once; a request past that waits up to
  ``connect_timeout`` for one, then fails with :class:`PoolTimeout`.
* **A connection dialled ahead.** Some servers close a connection after a streamed
  (chunked) answer without saying so in the head: llama.cpp's server does, after every
  one. Once the pool has found a connection closed by the server after such an answer
  (idle, or as a request was sent on it), it closes each connection that ends a chunked
  answer itself and dials a new plain one in its place, if none dialled ahead is waiting;
  so it does after a chunked answer whose head said ``connection: close``.
  That connect, and the server's accept, then happen while the pool is idle, not on the
  next request's way to its first byte. At most one such connection waits at a time; it
  is checked and expires like any idle one. Servers that keep connections alive after
  chunked answers never get one.
* **One retry.** A request whose reused connection ends before a single byte of the
  response arrives (the server closed it while idle, the close racing our request) is
  sent once more on a new connection. Nothing else is retried.
* **Deadlines.** Connecting (with TLS, for ``https``) within ``connect_timeout``, each
  write within ``write_timeout``, and each read within ``read_timeout`` of the one
  before: the head, and every piece of a streamed body.
* **Cancellation.** A response left before its end (an error, ``aclose`` of a stream,
  a cancelled task) closes its connection, which is never reused half-read; closing is
  also how llama.cpp's and vLLM's servers learn to stop generating.

Exception tree (all are :class:`~helexa.runtime.base.BackendError`\\ s, so a backend can
let them through as they are)::

    BackendError
    ├── UpstreamProtocolError       the server's bytes are not HTTP/1.1 (bad_upstream_response)
    ├── UpstreamTimeout             a deadline passed on a read or a write (upstream_timeout)
    ├── BackendCrashed
    │   ├── UpstreamUnreachable     cannot connect: refused, no route, no name, timeout
    │   └── UpstreamClosed          the connection broke or ended inside a response
    └── Overloaded
        └── PoolTimeout             every connection stayed busy past connect_timeout
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from helexa.transport.dial import dial

from . import http1
from .base import BackendCrashed, BackendError, Overloaded
from .upstream_connection import Connection, connect_finished, dial_ahead

_RECEIVE = 65536


class UpstreamProtocolError(BackendError):
    code = "bad_upstream_response"


class UpstreamTimeout(BackendError):
    code = "upstream_timeout"


class UpstreamUnreachable(BackendCrashed):
    pass


class UpstreamClosed(BackendCrashed):
    pass


class PoolTimeout(Overloaded):
    pass


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response: status, head and body."""

    status: int
    head: http1.Head
    body: bytes


class Upstream:
    """Keep-alive HTTP/1.1 connections to the server at ``url`` (``http://`` or ``https://``).

    Args:
        url: the server's origin, e.g. ``http://127.0.0.1:8000`` (a path is ignored: each
            request names its own).
        connect_timeout: seconds to connect (and do TLS); also how long a request waits
            for a connection when ``max_connections`` are busy.
        read_timeout: seconds the server may take to send the response head, or between
            two pieces of a body.
        write_timeout: seconds the server may take to accept a request's bytes.
        max_connections: connections open at once (busy and idle).
        idle_timeout: seconds an idle connection is kept for reuse.
        headers: sent with every request (e.g. ``authorization``).
        ssl_context: for ``https``; the default verifies certificates as usual.

    Raises :class:`ValueError` for a URL it cannot use or a header with a control
    character. Call :meth:`aclose` when done (it closes the idle connections; busy ones
    close as their requests end).
    """

    def __init__(self, url: str, *, connect_timeout: float = 10.0, read_timeout: float = 600.0,
                 write_timeout: float = 10.0, max_connections: int = 256, idle_timeout: float = 4.0,
                 headers: tuple[tuple[str, str], ...] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an upstream URL must be http:// or https:// with a host, not {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        host_header = parts.netloc.rpartition("@")[2]
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._host_header = host_header
        self._headers = tuple(headers)
        http1.request_head("GET", "/", host_header, self._headers)  # validates them once
        self._ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], bytes] = {}
        self._idle: list[Connection] = []
        self._open = 0
        self._waiting = trio.lowlevel.ParkingLot()
        self._closed = False
        # Where the last plain connection went, and whether the server closes connections
        # after chunked answers (then one is dialled ahead: the module docstring).
        self._peer: tuple[int, object] | None = None
        self._dial_ahead = False

    def set_headers(self, headers: tuple[tuple[str, str], ...]) -> None:
        """Send ``headers`` with every request from now on, instead of those given before (a
        supervised server's new key after a restart). Raises :class:`ValueError` as the
        constructor does; each request head is prepared once again, then reused."""
        http1.request_head("GET", "/", self._host_header, tuple(headers))
        self._headers = tuple(headers)
        self._heads.clear()

    @property
    def connections(self) -> tuple[int, int]:
        """(open, idle) connections right now."""
        return self._open, len(self._idle)

    # --- requests -------------------------------------------------------------------------

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: tuple[tuple[str, str], ...] = (), *, max_body: int = 64 << 20) -> Response:
        """Send one request and read its whole response (at most ``max_body`` bytes).

        Raises the errors of the module docstring; any HTTP status is a :class:`Response`.
        """
        conn, head = await self._exchange(method, path, body, headers)
        try:
            reader, parts, size = conn.reader, [], 0
            while True:
                data = reader.body()
                if data:
                    parts.append(data)
                    size += len(data)
                    if size > max_body:
                        raise UpstreamProtocolError(f"{self.origin}: response body over {max_body} bytes")
                if reader.state is http1.State.DONE:
                    break
                if not data:
                    reader.feed(await self._receive(conn))
        except http1.IncompleteResponse as exc:
            self._discard(conn)
            raise UpstreamClosed(f"{self.origin}: {exc}") from None
        except http1.ProtocolError as exc:
            self._discard(conn)
            raise UpstreamProtocolError(f"{self.origin}: {exc}") from None
        except BaseException:
            self._discard(conn)
            raise
        self._release(conn)
        return Response(head.status, head, parts[0] if len(parts) == 1 else b"".join(parts))

    async def stream(self, method: str, path: str, body: bytes | None = None,
                     headers: tuple[tuple[str, str], ...] = ()) -> StreamedResponse:
        """Send one request and return once its head is here; read the body from the
        :class:`StreamedResponse`, which must be closed (``async with`` or :meth:`aclose`).

        Raises the errors of the module docstring; any HTTP status is a response.
        """
        conn, head = await self._exchange(method, path, body, headers)
        return StreamedResponse(self, conn, head)

    async def aclose(self) -> None:
        """Close the idle connections; busy ones are closed when their requests end."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
        await trio.lowlevel.checkpoint()

    # --- internals ------------------------------------------------------------------------

    async def _exchange(self, method: str, path: str, body: bytes | None,
                        headers: tuple[tuple[str, str], ...]) -> tuple[Connection, http1.Head]:
        if self._closed:
            raise UpstreamUnreachable(f"{self.origin}: the client is closed")
        key = (method, path, headers)
        prefix = self._heads.get(key)
        if prefix is None:
            if len(self._heads) >= 64:
                self._heads.clear()
            prefix = self._heads[key] = http1.request_head(method, path, self._host_header, self._headers + headers)
        data = prefix + b"\r\n" if body is None else prefix + b"content-length: %d\r\n\r\n" % len(body) + body
        for attempt in (1, 2):
            conn, reused = await self._acquire()
            try:
                await self._send(conn, data)
                conn.reader.start(head_request=method == "HEAD")
                reader = conn.reader
                # The answer cannot be there yet: wait before the first read (a read that
                # fails costs a system call, the largest cost of a request after Python's).
                reader.feed(await self._receive(conn, wait_first=True))
                while (head := reader.head()) is None:
                    reader.feed(await self._receive(conn))
                return conn, head
            except (http1.IncompleteResponse, UpstreamClosed) as exc:
                self._discard(conn)
                # Closed by the server while idle, racing our request: once more, afresh.
                if reused and attempt == 1 and not conn.reader.received_any:
                    if conn.after_chunked:
                        self._dial_ahead = True  # the server closed a connection we kept
                    continue
                raise UpstreamClosed(f"{self.origin}: {exc}") from None
            except http1.ProtocolError as exc:
                self._discard(conn)
                raise UpstreamProtocolError(f"{self.origin}: {exc}") from None
            except BaseException:
                self._discard(conn)
                raise
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[Connection, bool]:
        deadline = None
        while True:
            now = trio.current_time()
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self.idle_timeout and conn.looks_alive():
                    if conn.ahead:
                        conn.ahead = False
                        if not await self._connected(conn):
                            continue
                    return conn, True
                if conn.after_chunked and now - conn.idle_since < self.idle_timeout:
                    self._dial_ahead = True  # the server closed a connection we kept
                self._discard(conn)
            if self._open < self.max_connections:
                break
            if deadline is None:
                deadline = now + self.connect_timeout
            with trio.CancelScope(deadline=deadline):
                await self._waiting.park()
            if trio.current_time() >= deadline:
                raise PoolTimeout(f"{self.origin}: all {self.max_connections} connections stayed busy "
                                  f"for {self.connect_timeout:g}s")
        self._open += 1
        try:
            return await self._connect(), False
        except BaseException:
            self._open -= 1
            self._waiting.unpark()
            raise

    async def _connect(self) -> Connection:
        with trio.move_on_after(self.connect_timeout):
            try:
                sock = await dial(self.host, self.port)
            except OSError as exc:
                raise UpstreamUnreachable(f"{self.origin}: cannot connect: {exc}") from None
            if self._ssl is None:
                # The plain socket is driven directly (see _send, _receive): trio's stream
                # layers cost more per request than the rest of the client.
                self._peer = (sock.family, sock.getpeername())
                return Connection(sock, None, sock)
            tcp = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            stream = trio.SSLStream(tcp, self._ssl, server_hostname=self.host, https_compatible=True)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                tcp.socket.close()
                raise UpstreamUnreachable(f"{self.origin}: TLS handshake failed: {exc}") from None
            except BaseException:
                tcp.socket.close()
                raise
            return Connection(None, stream, tcp.socket)  # type: ignore[arg-type]
        raise UpstreamUnreachable(f"{self.origin}: no connection within {self.connect_timeout:g}s")

    async def _send(self, conn: Connection, data: bytes) -> None:
        sock = conn.sock
        if sock is None:
            with trio.move_on_after(self.write_timeout) as scope:
                try:
                    await conn.stream.send_all(data)  # type: ignore[union-attr]
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise UpstreamClosed(str(exc.__cause__ or exc)) from None
            if scope.cancelled_caught:
                raise UpstreamTimeout(f"{self.origin}: the request was not accepted within {self.write_timeout:g}s")
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        view, deadline = memoryview(data), None
        try:
            while view:
                try:
                    view = view[sock.send(view):]
                    continue
                except BlockingIOError:
                    pass
                if deadline is None:
                    deadline = trio.current_time() + self.write_timeout
                with trio.CancelScope(deadline=deadline) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    raise UpstreamTimeout(f"{self.origin}: the request was not accepted within {self.write_timeout:g}s")
        except OSError as exc:  # reset, broken pipe
            raise UpstreamClosed(str(exc)) from None

    async def _receive(self, conn: Connection, wait_first: bool = False) -> bytes:
        """The next bytes from the server; ``b""`` when it closed or reset the connection.
        Always a checkpoint, as trio's own receives are. ``wait_first``: wait until the
        socket is readable before trying to read."""
        sock = conn.sock
        if sock is None:
            with trio.move_on_after(self.read_timeout):
                try:
                    return await conn.stream.receive_some(_RECEIVE)  # type: ignore[union-attr]
                except trio.BrokenResourceError:
                    return b""
            raise UpstreamTimeout(f"{self.origin}: no answer within {self.read_timeout:g}s")
        if not wait_first:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = sock.recv(_RECEIVE)
            except BlockingIOError:
                pass
            except OSError:
                return b""
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        with trio.CancelScope(deadline=trio.current_time() + self.read_timeout):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(_RECEIVE)
                except BlockingIOError:
                    continue
                except OSError:
                    return b""
        raise UpstreamTimeout(f"{self.origin}: no answer within {self.read_timeout:g}s")

    def _release(self, conn: Connection) -> None:
        chunked = conn.reader.chunked
        if chunked and (self._dial_ahead or not conn.reader.reusable):
            # The server closes it (or said it would): a new one takes its place.
            self._discard(conn)
            self._dial()
        elif conn.reader.reusable and not self._closed and self.idle_timeout > 0:
            conn.idle_since = trio.current_time()
            conn.after_chunked = chunked
            self._idle.append(conn)
            self._waiting.unpark()
        else:
            self._discard(conn)

    def _dial(self) -> None:
        """Dial one plain connection ahead, unless one waits already (module docstring).
        The connect runs in the kernel; :meth:`_connected` finishes it when it is taken."""
        if (self._peer is None or self._closed or self.idle_timeout <= 0 or self._open >= self.max_connections
                or any(c.ahead for c in self._idle)):
            return
        conn = dial_ahead(*self._peer)
        if conn is None:
            return
        conn.idle_since = trio.current_time()
        self._open += 1
        self._idle.append(conn)  # taken first: the pool takes its newest idle connection

    async def _connected(self, conn: Connection) -> bool:
        """Finish the connect of a connection dialled ahead (done already on a local
        server); False when it failed: it is discarded, and the pool dials as usual."""
        try:
            if await connect_finished(conn, self.connect_timeout):
                return True
        except BaseException:
            self._discard(conn)
            raise
        self._discard(conn)
        return False

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1
        self._waiting.unpark()


class StreamedResponse:
    """A response whose body is read as it arrives (see :meth:`Upstream.stream`).

    :meth:`receive` returns the next decoded piece of the body, ``b""`` at its end. The
    connection goes back to the pool only when the body was read to its end; closing the
    response before that (or after an error) closes the connection.
    """

    __slots__ = ("_upstream", "_conn", "head", "status", "_done")

    def __init__(self, upstream: Upstream, conn: Connection, head: http1.Head) -> None:
        self._upstream = upstream
        self._conn: Connection | None = conn
        self.head = head
        self.status = head.status
        self._done = False

    async def receive(self) -> bytes:
        """The next piece of the body, ``b""`` once it has all been read.

        Raises :class:`UpstreamClosed`, :class:`UpstreamProtocolError`,
        :class:`UpstreamTimeout`; the connection is closed then."""
        conn = self._conn
        if conn is None:
            if self._done:
                return b""
            raise UpstreamClosed(f"{self._upstream.origin}: the response was closed")
        reader = conn.reader
        try:
            while True:
                data = reader.body()
                if reader.state is http1.State.DONE:
                    self._done = True
                    self._conn = None
                    self._upstream._release(conn)
                    return data
                if data:
                    return data
                reader.feed(await self._upstream._receive(conn))
        except http1.IncompleteResponse as exc:
            self._abandon()
            raise UpstreamClosed(f"{self._upstream.origin}: {exc}") from None
        except http1.ProtocolError as exc:
            self._abandon()
            raise UpstreamProtocolError(f"{self._upstream.origin}: {exc}") from None
        except BaseException:
            self._abandon()
            raise

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The rest of the body (at most ``limit`` bytes; past that the connection is
        closed and what was read is returned)."""
        parts, size = [], 0
        while data := await self.receive():
            parts.append(data)
            size += len(data)
            if size >= limit:
                self._abandon()
                break
        return b"".join(parts)[:limit]

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        self._abandon()

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._upstream._discard(conn)

    async def __aenter__(self) -> StreamedResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._abandon()
