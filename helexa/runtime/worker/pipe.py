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
import threading
from contextlib import suppress
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

    :meth:`post` may be called from anywhere on the trio thread, and :meth:`post_from_thread`
    from any other thread (an engine's thread sending its tokens itself: :mod:`..token_tap`);
    :meth:`receive_batch` is for one reader task; :meth:`run` writes what the socket could
    not take at once, and must run (in a nursery) for as long as the pipe is used.

    Args:
        sock: one end of a connected stream socket; made non-blocking.
        max_frame: the largest frame accepted from the peer.
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._reader = FrameReader(max_frame)
        # The socket, what it has not taken yet and the broken state are shared with the
        # threads that post: all three change only under this lock, so frames never
        # interleave and never overtake one another. The events are the trio thread's.
        self._lock = threading.Lock()
        self._out = bytearray()
        self._wake = trio.Event()
        self._flushed = trio.Event()
        self._flushed.set()
        self._broken: str | None = None
        self._hurried = False
        self._token: trio.lowlevel.TrioToken | None = None
        with suppress(RuntimeError):  # made outside trio: run() takes the token
            self._token = trio.lowlevel.current_trio_token()

    # --- writing --------------------------------------------------------------------------

    def send(self, msg: Any) -> None:
        """Send one message (see :meth:`post`)."""
        self.post(frame(msg))

    def post(self, data: bytes) -> None:
        """Send already framed bytes, after everything posted before them.

        Raises :class:`ChannelClosed` when the peer is gone. Never blocks: what the socket
        does not take now is written by :meth:`run` (a peer that stops reading makes this
        buffer grow until it is killed for not answering)."""
        try:
            more = self._write(data)
        except ChannelClosed:
            self._kick()
            raise
        if more:
            self._kick()

    def post_from_thread(self, data: bytes) -> None:
        """:meth:`post` from a thread other than the trio thread, once :meth:`run` runs.

        The bytes are written from the calling thread when the socket takes them; only
        what it does not take (or a broken pipe) wakes the trio thread."""
        assert self._token is not None, "post_from_thread before Pipe.run"
        try:
            more = self._write(data)
        except ChannelClosed:
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._kick)
            raise
        if more:
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._kick)

    def _write(self, data: bytes) -> bool:
        """Write or keep ``data``; True when :meth:`run` must be woken to write the rest."""
        with self._lock:
            if self._broken is not None:
                raise ChannelClosed(self._broken)
            if self._out:
                self._out += data
                return False  # run() is already on it
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._broken = _why(exc)
                raise ChannelClosed(self._broken) from None
            if sent == len(data):
                return False
            self._out += memoryview(data)[sent:]
            return True

    def _kick(self) -> None:
        """Wake :meth:`run` (on the trio thread), and say whether the pipe is flushed: not
        while bytes wait, and as good as flushed once it broke."""
        if self._broken is not None:
            self._flushed.set()
        elif self._out and self._flushed.is_set():
            self._flushed = trio.Event()
        self._wake.set()

    @property
    def flushed(self) -> bool:
        """True when everything posted has been written."""
        return not self._out

    async def wait_flushed(self) -> None:
        """Return once everything posted so far has been written (or the pipe broke)."""
        while self._out and self._broken is None:
            self._kick()  # a thread's bytes may not have woken the writer yet
            await self._flushed.wait()
        await trio.lowlevel.checkpoint()

    async def run(self) -> None:
        """Write what :meth:`post` could not, until cancelled or the pipe breaks."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            while self._broken is None:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._out and self._broken is None:
                    await trio.lowlevel.wait_writable(self._sock)
                    with self._lock:
                        if self._broken is not None:
                            break
                        try:
                            sent = self._sock.send(self._out)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            self._broken = _why(exc)
                            break
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
                self._break(_why(exc))
                raise ChannelClosed(self._broken) from None
            if not data:
                self._break("the other process closed its end")
                raise ChannelClosed(self._broken)
            if self._hurried:  # read twice in a row without waiting: let others run
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._hurried = True
            msgs = self._reader.feed(data)
            if msgs:
                return msgs

    # --- closing --------------------------------------------------------------------------

    def _break(self, why: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = why
        self._wake.set()
        self._flushed.set()

    async def aclose(self) -> None:
        """Close this end (what is not yet written is dropped); idempotent."""
        with self._lock:
            if self._broken is None:
                self._broken = "closed"
            if self._sock.fileno() != -1:
                trio.lowlevel.notify_closing(self._sock)
                self._sock.close()
        self._wake.set()
        self._flushed.set()
        await trio.lowlevel.checkpoint()


def _why(exc: OSError) -> str:
    return f"the other process is gone ({type(exc).__name__})"
