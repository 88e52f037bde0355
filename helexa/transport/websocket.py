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

from .channel import Channel, ChannelClosed, ConnectFailed

log = logging.getLogger(__name__)

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


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
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[WebSocketChannel]:
    """Open a channel to ``url`` (``ws://`` or ``wss://``).

    Raises:
        ConnectFailed: refused, unreachable, TLS failure, or no handshake within ``timeout``.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("ws", "wss"):
        raise ConnectFailed(f"unsupported URL scheme {scheme!r} in {url!r} (use ws:// or wss://)")
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


async def serve(
    handler: Callable[[WebSocketChannel], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    handshake_timeout: float = 10.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve websocket channels until cancelled; reports the bound port via ``started``.

    Each accepted connection runs ``handler(channel)`` in its own task; an exception
    escaping a handler is logged and closes only that connection.
    """

    async def on_request(request: WebSocketRequest) -> None:
        try:
            ws = await request.accept()
        except Exception as exc:
            log.info("websocket upgrade failed: %s", exc)
            return
        remote = f"{ws.remote.address}:{ws.remote.port}" if hasattr(ws.remote, "port") else str(ws.remote)
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

    async with trio.open_nursery() as nursery:
        srv = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                on_request,
                host,
                port,
                ssl_context,
                message_queue_size=64,
                max_message_size=max_frame,
                connect_timeout=handshake_timeout,
                disconnect_timeout=2,
                task_status=task_status,
            )
        )
        task_status.started(srv.port)
