"""The websocket transport (``ws://`` and ``wss://``) on trio-websocket.

Close codes used: 1000 normal, 1001 going away, 1002 protocol error (malformed or unknown
frame), 1008 policy violation (refused join), 1009 frame too large.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from helexa.protocol import DEFAULT_MAX_FRAME, Fault, ProtocolError, decode, encode
from helexa.protocol.auth import cert_fingerprint

from .admission import PendingHandshakes
from .channel import Channel, ChannelClosed, ConnectFailed

log = logging.getLogger(__name__)

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013


class WebSocketChannel(Channel):
    """A :class:`Channel` over one trio-websocket connection."""

    def __init__(self, ws: WebSocketConnection, *, max_frame: int, remote: str) -> None:
        self._ws = ws
        self._max_frame = max_frame
        self.remote = remote

    async def send(self, msg: Any) -> None:
        # No lock of our own: trio-websocket serialises writers with its FIFO stream lock,
        # and a second lock cost a yield to the scheduler per frame.
        try:
            await self._ws.send_message(encode(msg))
        except ConnectionClosed as exc:
            raise ChannelClosed(str(exc.reason), code=exc.reason.code) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(f"connection broken: {exc}") from None

    async def receive(self) -> Any:
        try:
            data = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise ChannelClosed(f"closed by peer: {exc.reason}", code=exc.reason.code) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(f"connection broken: {exc}") from None
        if isinstance(data, str):
            await self._fail(ProtocolError("text frames are not part of the protocol"))
        try:
            return decode(data, max_size=self._max_frame)
        except ProtocolError as exc:
            await self._fail(exc)
            raise

    async def _fail(self, exc: ProtocolError) -> None:
        log.warning("protocol error from %s: %s; closing", self.remote, exc)
        code = CLOSE_TOO_BIG if exc.code == "oversized" else CLOSE_PROTOCOL_ERROR
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                await self.send(Fault(exc.code, str(exc)))
            except ChannelClosed:
                pass
            await self.aclose(code, exc.code)
        raise exc

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                await self._ws.aclose(code, reason[:120])
            except Exception:  # an already broken socket: nothing left to close politely
                pass


def _ssl_for(url: str, ssl_context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if urlsplit(url).scheme == "wss":
        return ssl_context or ssl.create_default_context()
    return None


@asynccontextmanager
async def connect(
    url: str,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    pin: str | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[WebSocketChannel]:
    """Open a channel to ``url`` (``ws://`` or ``wss://``).

    With ``pin`` (a ``wss://`` URL), the server's certificate must have that SHA-256
    (:func:`helexa.protocol.auth.cert_fingerprint`); it is checked right after the TLS
    handshake, before a byte of the websocket upgrade is sent, and ``ssl_context`` need not
    verify anything itself.

    Raises:
        ConnectFailed: refused, unreachable, TLS failure, a certificate that does not match
            ``pin``, or no handshake within ``timeout``.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("ws", "wss"):
        raise ConnectFailed(f"unsupported URL scheme {scheme!r} in {url!r} (use ws:// or wss://)")
    if pin is not None:
        if scheme != "wss":
            raise ConnectFailed(f"a certificate pin needs a wss:// URL, got {url!r}")
        async with _connect_pinned(url, pin, timeout, ssl_context, max_frame) as channel:
            yield channel
        return
    try:
        cm = trio_websocket.open_websocket_url(
            url,
            _ssl_for(url, ssl_context),
            message_queue_size=64,
            max_message_size=max_frame,
            connect_timeout=timeout,
            disconnect_timeout=2,
        )
        ws = await cm.__aenter__()
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionTimeout, ssl.SSLError) as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc}") from None
    channel = WebSocketChannel(ws, max_frame=max_frame, remote=url)
    try:
        yield channel
    finally:
        with trio.move_on_after(3) as scope:
            scope.shield = True
            try:
                await cm.__aexit__(None, None, None)
            except Exception:
                pass


@asynccontextmanager
async def _connect_pinned(url: str, pin: str, timeout: float, ssl_context: ssl.SSLContext | None,
                          max_frame: int) -> AsyncIterator[WebSocketChannel]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if ssl_context is None:
        ssl_context = ssl.create_default_context()
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    failure: str | None = None
    async with trio.open_nursery() as nursery:
        stream: trio.SSLStream[trio.SocketStream] | None = None
        ws: WebSocketConnection | None = None
        try:
            with trio.fail_after(timeout):
                tcp = await trio.open_tcp_stream(host, port)
                stream = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
                await stream.do_handshake()
                seen = cert_fingerprint(stream.getpeercert(binary_form=True) or b"")
                if seen != pin:
                    failure = (f"its certificate (sha256 {seen[:16]}...) is not the one the join token pins "
                               f"(sha256 {pin[:16]}...)")
                else:
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, stream, f"{host}:{port}", resource, message_queue_size=64,
                        max_message_size=max_frame)
        except trio.TooSlowError:
            failure = f"no handshake within {timeout:g}s"
        except (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError, ssl.SSLError) as exc:
            failure = str(exc) or type(exc).__name__
        if ws is None:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
        else:
            # A failure inside the body must not escape the nursery (it would come out
            # wrapped in an ExceptionGroup): it is raised after.
            try:
                yield WebSocketChannel(ws, max_frame=max_frame, remote=url)
            finally:
                with trio.move_on_after(3) as scope:
                    scope.shield = True
                    try:
                        await ws.aclose()
                    except Exception:
                        pass
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise ConnectFailed(f"cannot connect to {url}: {failure}")


def _peer(stream: trio.abc.Stream) -> str | None:
    """``"addr:port"`` of the peer; None when it is already gone (reset before we looked)."""
    sock = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else getattr(stream, "socket", None)
    if sock is None:
        return repr(stream)
    try:
        addr, port, *_ = sock.getpeername()
    except OSError:
        return None
    return f"{addr}:{port}"


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")
"""What a connection turned away at the cap reads: a websocket client fails its connect at
once on it (a bare close before the upgrade's answer left trio-websocket waiting out its
whole connect timeout), and the neuron redials on its own backoff with jitter."""


class _Admitting(trio.abc.Listener[trio.abc.Stream]):
    """A listener that turns a new connection away at once when ``pending`` is full.

    It wraps the outermost listener (the TLS one for ``wss://``) and returns its streams
    unchanged, so trio-websocket still sees a socket or TLS stream. A plain connection
    turned away is answered ``503`` (``Retry-After: 1``) and closed; a TLS one is only
    closed (a TLS handshake is lazy, so refusing costs no crypto; its client waits out its
    connect timeout before it redials).
    """

    def __init__(self, inner: trio.abc.Listener[Any], pending: PendingHandshakes) -> None:
        self.inner = inner
        self.pending = pending

    async def accept(self) -> trio.abc.Stream:
        while True:
            stream = await self.inner.accept()
            peer = _peer(stream)
            if peer is None:  # reset while it waited in the backlog (a neuron that gave up)
                await trio.aclose_forcefully(stream)
                continue
            if self.pending.admit(peer, trio.current_time()):
                return stream
            if self.pending.refused in (1, 10, 100) or self.pending.refused % 1000 == 0:
                log.warning("%d pending handshakes: refused %d connections so far", len(self.pending),
                            self.pending.refused)
            if isinstance(stream, trio.SocketStream):
                # A fresh socket's send buffer is empty: this never waits in practice, and
                # the deadline bounds the accept loop if it ever did.
                with trio.move_on_after(1):
                    try:
                        await stream.send_all(_BUSY)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def serve(
    handler: Callable[[WebSocketChannel], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    handshake_timeout: float = 10.0,
    pending: PendingHandshakes | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve websocket channels until cancelled; reports the bound port via ``started``.

    Each accepted connection runs ``handler(channel)`` in its own task; an exception
    escaping a handler is logged and closes only that connection. With ``pending``, a
    connection counts in it from its accept (refused at once past its limit) until the
    handler releases it (or the connection ends); the websocket upgrade must finish within
    ``handshake_timeout``.
    """

    async def on_request(request: WebSocketRequest) -> None:
        try:
            endpoint = request.remote
        except OSError:
            # The peer reset the connection after sending its upgrade and before we read it
            # (in a join storm: a neuron whose deadline passed). Nothing to answer; its
            # pending entry, if any, is forgotten at the handshake deadline.
            log.info("a connection went away before its websocket upgrade was read")
            return
        remote = f"{endpoint.address}:{endpoint.port}" if hasattr(endpoint, "port") else str(endpoint)
        try:
            try:
                ws = await request.accept()
            except Exception as exc:
                log.info("websocket upgrade failed: %s", exc)
                return
            channel = WebSocketChannel(ws, max_frame=max_frame, remote=remote)
            try:
                await handler(channel)
            except ProtocolError:
                pass  # already logged and closed by the channel
            except ChannelClosed:
                pass
            except Exception:
                log.exception("control connection handler failed for %s", remote)
            finally:
                await channel.aclose()
        finally:
            if pending is not None:
                pending.release(remote)

    tcp = await trio.open_tcp_listeners(port, host=host)
    bound = tcp[0].socket.getsockname()[1]
    listeners: list[Any] = tcp
    if ssl_context is not None:
        listeners = [trio.SSLListener(l, ssl_context, https_compatible=True) for l in listeners]
    if pending is not None:
        listeners = [_Admitting(l, pending) for l in listeners]
    server = trio_websocket.WebSocketServer(
        on_request,
        listeners,
        message_queue_size=64,
        max_message_size=max_frame,
        connect_timeout=handshake_timeout,
        disconnect_timeout=2,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        task_status.started(bound)
