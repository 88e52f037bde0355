"""One connection of :class:`~helexa.runtime.upstream.Upstream`'s pool, and the one it
dials ahead.

A :class:`Connection` is a plain socket driven directly, or a TLS stream, with the reader
of its responses and what the pool knows of it while it is idle. :func:`dial_ahead`
starts a plain connection whose connect runs in the kernel while the pool is idle (the
pool's module docstring says when); :func:`connect_finished` ends that connect when the
connection is taken.
"""

from __future__ import annotations

import select
import socket

import trio

from helexa.transport.dial import connecting

from . import http1

__all__ = ["Connection", "connect_finished", "dial_ahead"]


class Connection:
    """One connection and the reader of its responses: a plain socket driven directly
    (``sock``), or a TLS stream (``stream``)."""

    __slots__ = ("sock", "stream", "reader", "poll", "idle_since", "ahead", "after_chunked", "_fd_owner")

    def __init__(self, sock: socket.socket | None, stream: trio.SSLStream | None, fd_owner: socket.socket,
                 *, ahead: bool = False) -> None:
        self.sock = sock
        self.stream = stream
        self.reader = http1.ResponseReader()
        self.idle_since = 0.0
        self.ahead = ahead  # dialled ahead, not yet used; its connect may still be under way
        self.after_chunked = False  # its last answer came in chunks (while it is idle)
        # A plain socket that is readable while idle was closed by the server (or holds
        # bytes nobody asked for): either way it is not reusable. TLS may send records
        # of its own (session tickets), so there the retry alone covers a stale connection.
        self.poll: select.poll | None = None
        if sock is not None:
            self.poll = select.poll()
            self.poll.register(fd_owner.fileno(), select.POLLIN)
        self._fd_owner = fd_owner

    def looks_alive(self) -> bool:
        return self.poll is None or not self.poll.poll(0)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._fd_owner)
        self._fd_owner.close()


def dial_ahead(family: int, address: object) -> Connection | None:
    """A plain connection to ``address`` whose connect is under way (or done), or None
    where it could not even begin (out of descriptors, refused at once): best effort, the
    next request then connects as usual."""
    try:
        sock, _ = connecting(family, address)
    except OSError:
        return None
    return Connection(sock, None, sock, ahead=True)


async def connect_finished(conn: Connection, timeout: float) -> bool:
    """Wait up to ``timeout`` for the connect of a connection dialled ahead (done already
    on a local server); whether it succeeded."""
    sock = conn.sock
    assert sock is not None
    if not _writable(sock):
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_writable(sock)
    return _writable(sock) and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _writable(sock: socket.socket) -> bool:
    """Whether ``sock``'s connect is over (either way), without waiting."""
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLOUT)
    return bool(poll.poll(0))
