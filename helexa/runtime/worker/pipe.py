"""Framed protocol messages over one end of a local stream socket (a socketpair).

Both the neuron and its worker processes use it. Frames are those of
:mod:`helexa.protocol.worker`; the socket's errors become
:class:`helexa.transport.ChannelClosed` here, at the boundary.

Writes never wait: :meth:`Pipe.post` writes what the socket takes at once and keeps the
rest, in order, for :meth:`Pipe.run` to write as the peer reads. A round trip between two
trio processes costs a few scheduler passes on each side, and most of a request's cost
through a worker is there (docs/benchmarks.md): a write that would take one more pass
(a lock, then the write's own checkpoint) is a write that costs a pass per message.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

from helexa.protocol.worker import FrameReader, frame
from helexa.transport import ChannelClosed

READ_SIZE = 256 * 1024

MAX_FRAME = 256 * 1024 * 1024
"""The largest frame either side accepts. The peer is our own process, so this only
turns a corrupt length into a clear error; it is well above the control plane's frame
limit, so that any request a neuron accepted can be handed to its worker."""


class Pipe:
    """Messages over a connected stream socket (the pipe owns it).

    :meth:`post` may be called from anywhere on the trio thread; :meth:`receive_batch` is
    for one reader task; :meth:`run` writes what the socket could not take at once, and
    must run (in a nursery) for as long as the pipe is used.

    Args:
        sock: one end of a connected stream socket; made non-blocking.
        max_frame: the largest frame accepted from the peer.
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._reader = FrameReader(max_frame)
        self._out = bytearray()
        self._wake = trio.Event()
        self._flushed = trio.Event()
        self._flushed.set()
        self._broken: str | None = None
        self._hurried = False

    # --- writing --------------------------------------------------------------------------

    def send(self, msg: Any) -> None:
        """Send one message (see :meth:`post`)."""
        self.post(frame(msg))

    def post(self, data: bytes) -> None:
        """Send already framed bytes, after everything posted before them.

        Raises :class:`ChannelClosed` when the peer is gone. Never blocks: what the socket
        does not take now is written by :meth:`run` (a peer that stops reading makes this
        buffer grow until it is killed for not answering)."""
        if self._broken is not None:
            raise ChannelClosed(self._broken)
        if not self._out:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._break(exc)
                raise ChannelClosed(self._broken) from None
            if sent == len(data):
                return
            data = data[sent:]
            self._flushed = trio.Event()
        self._out += data
        self._wake.set()

    @property
    def flushed(self) -> bool:
        """True when everything posted has been written."""
        return not self._out

    async def wait_flushed(self) -> None:
        """Return once everything posted so far has been written (or the pipe broke)."""
        await self._flushed.wait()

    async def run(self) -> None:
        """Write what :meth:`post` could not, until cancelled or the pipe breaks."""
        try:
            while self._broken is None:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._out and self._broken is None:
                    await trio.lowlevel.wait_writable(self._sock)
                    try:
                        sent = self._sock.send(self._out)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self._break(exc)
                        return
                    del self._out[:sent]
                self._flushed.set()
        finally:
            self._flushed.set()

    # --- reading --------------------------------------------------------------------------

    async def receive_batch(self) -> list[Any]:
        """The next messages that arrived (at least one), in order.

        Raises:
            ChannelClosed: the peer closed its end or went away.
            DecodeError: the peer sent a malformed frame.
        """
        while True:
            try:
                data = self._sock.recv(READ_SIZE)
            except BlockingIOError:
                self._hurried = False
                await trio.lowlevel.wait_readable(self._sock)
                continue
            except OSError as exc:
                self._break(exc)
                raise ChannelClosed(self._broken) from None
            if not data:
                self._break(None)
                raise ChannelClosed(self._broken)
            if self._hurried:  # read twice in a row without waiting: let others run
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._hurried = True
            msgs = self._reader.feed(data)
            if msgs:
                return msgs

    # --- closing --------------------------------------------------------------------------

    def _break(self, exc: OSError | None) -> None:
        if self._broken is None:
            self._broken = "the other process closed its end" if exc is None else (
                f"the other process is gone ({type(exc).__name__})")
        self._wake.set()
        self._flushed.set()

    async def aclose(self) -> None:
        """Close this end (what is not yet written is dropped); idempotent."""
        if self._broken is None:
            self._broken = "closed"
        self._wake.set()
        self._flushed.set()
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()
