"""The websocket server of the control plane: a thin trio shell around the sans-IO
upgrade (:mod:`.wsupgrade`); each upgraded connection is a :class:`.ws_channel.ServerChannel`.

Each connection is one task: it reads the upgrade, then runs the handler, whose
``channel.receive()`` reads and parses frames in that same task (no reader task or
memory channel per connection, as trio-websocket has: at thousands of neurons those were
most of the cortex's CPU per heartbeat). Neurons dial with :mod:`.ws_client`; any RFC 6455
client works (the tests also use trio-websocket's). The close codes are
:mod:`.ws_channel`'s.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from helexa.protocol import DEFAULT_MAX_FRAME, ProtocolError

from . import accept_errors, wsframes, wsupgrade
from .admission import PendingHandshakes, ReadBudget
from .channel import ChannelClosed
from .ws_channel import ServerChannel, read_head

__all__ = ["ServerChannel", "serve"]

log = logging.getLogger(__name__)


# --- the server ------------------------------------------------------------------------------


async def serve(
    handler: Callable[[ServerChannel], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    first_max_frame: int | None = None,
    handshake_timeout: float = 10.0,
    pending: PendingHandshakes | None = None,
    budget: ReadBudget | None = None,
    backlog: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve websocket channels until cancelled; reports the bound port via ``started``.

    Each accepted connection runs ``handler(channel)`` in its own task; an exception
    escaping a handler is logged and closes only that connection. With ``pending``, a
    connection counts in it from its accept (refused at once past its limit: ``503`` with
    ``Retry-After: 1`` on ``ws://``, only closed on ``wss://``, where TLS has not started)
    until the handler releases it (or the connection ends); the TLS handshake and the
    websocket upgrade must finish within ``handshake_timeout``. ``backlog`` is the listen
    backlog (the kernel's ``somaxconn`` when None). ``first_max_frame``: the largest frame a
    connection may send until the handler raises its limit to ``max_frame``
    (:meth:`~.channel.Channel.set_max_frame`, once the peer proved who it is), so a peer
    nobody knows yet cannot make the server hold ``max_frame`` bytes per connection.
    ``budget``: what every connection reads until then, all together (past it one is closed
    1013, try again later), so that ``pending`` connections cannot hold ``first_max_frame``
    bytes each either.
    """
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    bound = listeners[0].socket.getsockname()[1]
    # Accepted by hand (below): the listening sockets leave trio's listener objects.
    socks = [socket.socket(fileno=l.socket.detach()) for l in listeners]
    # The frame budget also bounds what a client may send in one message.
    first = min(max_frame, first_max_frame or max_frame)

    async def connection(raw: socket.socket, remote: str) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
        wire: trio.abc.Stream = stream
        try:
            if ssl_context is not None:
                wire = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
            conn = wsframes.ServerConnection(first + 64)
            upgraded = False
            with trio.move_on_after(handshake_timeout) as scope:
                upgraded = await _upgrade(wire, conn, remote)
            if scope.cancelled_caught:
                log.info("no websocket upgrade from %s within %gs", remote, handshake_timeout)
            if not upgraded:
                return
            channel = ServerChannel(wire, conn, max_frame=first, remote=remote,
                                    raw=raw if ssl_context is None else None, budget=budget)
            try:
                await handler(channel)
            except (ProtocolError, ChannelClosed):
                pass  # a protocol error was logged and closed by the channel
            except Exception:
                log.exception("control connection handler failed for %s", remote)
            finally:
                await channel.aclose()
        except Exception:  # one connection's failure never reaches the server's nursery
            log.exception("control connection from %s failed", remote)
        finally:
            if pending is not None:
                pending.release(remote)
            await trio.aclose_forcefully(wire)

    try:
        async with trio.open_nursery() as nursery:
            for sock in socks:
                nursery.start_soon(_accept_loop, sock, nursery, connection, pending, ssl_context is not None)
            task_status.started(bound)
    finally:
        for sock in socks:
            sock.close()


_ACCEPT_BATCH = 4096
"""The most connections accepted in one go: in practice all that wait (the kernel's
backlog is at most ``somaxconn`` deep); those past the pending cap cost a ``503`` each."""


async def _accept_loop(sock: socket.socket, nursery: trio.Nursery, connection: Any,
                       pending: PendingHandshakes | None, tls: bool) -> None:
    """Accept every connection waiting each time the socket is readable.

    trio's own listener takes one connection per trip through its scheduler, and a batch
    of 64 did no better in a storm: with 5,000 neurons' heartbeats a trip took about a
    second, so joins came 64 a second while the kernel's accept queue grew older than the
    neurons' handshake deadline."""
    sock.setblocking(False)
    failures = accept_errors.AcceptFailures(f"control socket {_name(sock)}")
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(_ACCEPT_BATCH):
            try:
                raw, addr = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in accept_errors.RETRY:
                    failures.note(exc, trio.current_time())
                    await trio.sleep(accept_errors.RETRY_AFTER)
                    break
                if exc.errno == errno.ECONNABORTED:  # reset while it waited in the backlog
                    continue
                raise
            remote = f"[{addr[0]}]:{addr[1]}" if raw.family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
            if pending is not None and not pending.admit(remote, trio.current_time()):
                _turn_away(raw, pending, tls)
                continue
            nursery.start_soon(connection, raw, remote)


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _turn_away(raw: socket.socket, pending: PendingHandshakes, tls: bool) -> None:
    if pending.refused in (1, 10, 100) or pending.refused % 1000 == 0:
        log.warning("%d pending handshakes: refused %d connections so far", len(pending), pending.refused)
    if not tls:
        # A websocket client fails its connect at once on this answer (a bare close before
        # the upgrade's answer leaves trio-websocket waiting out its whole connect timeout)
        # and the neuron redials on its backoff with jitter. A fresh socket's send buffer is
        # empty: the non-blocking send takes it all.
        try:
            raw.send(_BUSY)
        except OSError:
            pass
    raw.close()


_BUSY = wsupgrade.reject(503, retry_after=1)


async def _upgrade(stream: trio.abc.Stream, conn: wsframes.ServerConnection, remote: str) -> bool:
    """Read and answer the upgrade (the caller holds the deadline); bytes after the head go
    to ``conn``. False when the client went away or was refused (answered, then closed)."""
    try:
        read = await read_head(stream)
        if read is None:
            return False
        head, rest = read
        key = wsupgrade.parse_upgrade(head)
    except wsupgrade.UpgradeRejected as exc:
        log.info("websocket upgrade from %s refused: %s", remote, exc.reason)
        try:
            await stream.send_all(wsupgrade.reject(exc.status, exc.reason))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return False
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("a connection from %s went away before its websocket upgrade: %s", remote, exc)
        return False
    try:
        await stream.send_all(wsupgrade.accept(key))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    conn.receive_data(rest)
    return True
