"""The websocket transport (``ws://`` and ``wss://``): the client on trio-websocket, the
server in :mod:`.ws_server` (re-exported here as :func:`serve`).

Close codes used: 1000 normal, 1001 going away, 1002 protocol error (malformed or unknown
frame), 1008 policy violation (refused join), 1009 frame too large, 1013 try again later.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from helexa.protocol import DEFAULT_MAX_FRAME, Fault, ProtocolError, decode, encode
from helexa.protocol.auth import cert_fingerprint

from .channel import Channel, ChannelClosed, ConnectFailed
from .ws_server import ServerChannel, serve

__all__ = ["CLOSE_POLICY", "CLOSE_PROTOCOL_ERROR", "CLOSE_TOO_BIG", "CLOSE_TRY_LATER", "ServerChannel",
           "WebSocketChannel", "connect", "serve"]

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
