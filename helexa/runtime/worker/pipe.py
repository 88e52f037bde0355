"""Framed protocol messages over one end of a local stream socket (a socketpair).

Both the neuron and its worker processes use it. Frames are those of
:mod:`helexa.protocol.worker`; the transport's errors become
:class:`helexa.transport.ChannelClosed` here, at the boundary.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

from helexa.protocol import DEFAULT_MAX_FRAME
from helexa.protocol.worker import FrameReader, frame
from helexa.transport import ChannelClosed

READ_SIZE = 256 * 1024


class Pipe:
    """Messages over a byte stream.

    ``send`` and ``send_bytes`` may be called from many tasks (writes never interleave);
    ``receive_batch`` is for one reader task.

    Args:
        stream: one end of a stream socket.
        max_frame: the largest frame accepted from the peer.
    """

    def __init__(self, stream: trio.abc.Stream, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._stream = stream
        self._reader = FrameReader(max_frame)
        self._lock = trio.Lock()

    @classmethod
    def from_socket(cls, sock: socket.socket, **kwargs: Any) -> "Pipe":
        """Wrap a connected stdlib stream socket (the pipe now owns it)."""
        return cls(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), **kwargs)

    async def send(self, msg: Any) -> None:
        """Send one message. Raises :class:`ChannelClosed` when the peer is gone."""
        await self.send_bytes(frame(msg))

    async def send_bytes(self, data: bytes) -> None:
        """Send already framed bytes (one or several frames). Raises :class:`ChannelClosed`.

        Cancellation takes effect only before the first byte is written: a frame cut short
        would corrupt the stream. A write that cannot finish (the peer stopped reading) ends
        when the peer's end closes; the neuron kills a worker that stops answering."""
        async with self._lock:
            try:
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed(f"the other process is gone ({type(exc).__name__})") from None

    async def receive_batch(self) -> list[Any]:
        """The next messages that arrived (at least one), in order.

        Raises:
            ChannelClosed: the peer closed its end or went away.
            DecodeError: the peer sent a malformed frame.
        """
        while True:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed(f"the other process is gone ({type(exc).__name__})") from None
            if not data:
                raise ChannelClosed("the other process closed its end")
            msgs = self._reader.feed(data)
            if msgs:
                return msgs

    async def aclose(self) -> None:
        """Close this end; idempotent."""
        await trio.aclose_forcefully(self._stream)
