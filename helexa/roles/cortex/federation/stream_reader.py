"""The one reader of an inbound federation stream, for the stream's whole life.

The serving side must notice a ``Cancel`` (or the asker going away) while it generates,
and must not read the asker's next request as part of the current one. It did that with
a reader task started for each generation and cancelled before the answer went: on
py-libp2p a read started and then cancelled costs ~0.25 ms of CPU, on the answer's path
(``docs/benchmarks.md``). One reader per stream does the same with neither: frames read
while no exchange is active go to the serving loop in order (:meth:`StreamReader.next`);
while one is active (:meth:`StreamReader.begin` .. :meth:`StreamReader.end`), a
``Cancel`` for it stops it and anything else is dropped (an asker sends nothing else
mid-answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio

from helexa.mesh import MessageStream, StreamClosed, StreamTimeout
from helexa.protocol import Cancel, ProtocolError


@dataclass(eq=False)
class Exchange:
    """One request being served, as the stream's reader sees it. Run the serving under
    ``scope``: a ``Cancel`` from the asker, or the stream breaking, cancels it."""

    request_id: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cancelled: bool = False
    """The asker sent ``Cancel`` for it, or went away."""
    asker_gone: bool = False
    """The stream broke (closed, reset, timed out or carried garbage)."""

    def stop(self, *, gone: bool) -> None:
        self.cancelled = True
        self.asker_gone = self.asker_gone or gone
        self.scope.cancel()


class StreamReader:
    """Reads ``stream`` until it ends; run :meth:`run` in a nursery beside the serving."""

    def __init__(self, stream: MessageStream) -> None:
        self._stream = stream
        # Two frames: a hello and its request arrive together; more waits in the muxer.
        self._send, self._recv = trio.open_memory_channel[object](2)
        self._active: Exchange | None = None
        self._error: Exception | None = None

    async def run(self) -> None:
        """Read frames until the stream ends (then the serving loop's :meth:`next` raises
        what ended it, and an active exchange is stopped as gone)."""
        try:
            while True:
                try:
                    msg = await self._stream.receive(timeout=math.inf)
                except (StreamClosed, StreamTimeout, ProtocolError) as exc:
                    self._error = exc
                    if self._active is not None:
                        self._active.stop(gone=True)
                    return
                active = self._active
                if active is None:
                    try:
                        # Without a checkpoint while there is room: a request read from the
                        # same write as its hello is then queued before the serving loop
                        # wakes for the hello, and taken without a wait (half of them were
                        # not, each costing a cancel scope and a task switch).
                        self._send.send_nowait(msg)
                    except trio.WouldBlock:
                        await self._send.send(msg)
                elif isinstance(msg, Cancel) and msg.request_id == active.request_id:
                    active.stop(gone=False)
        finally:
            self._send.close()

    async def next(self, timeout: float) -> object:
        """The next frame read outside an exchange.

        Raises:
            StreamTimeout: none came within ``timeout``.
            StreamClosed, StreamTimeout, ProtocolError: the stream ended (what ended it).
        """
        try:
            # A request arrives in the same write as its hello: it is queued already, and
            # taken without a cancel scope (two per federated request otherwise).
            return self._recv.receive_nowait()
        except trio.WouldBlock:
            pass
        except trio.EndOfChannel:
            raise self._error or StreamClosed(f"{self._stream.remote_peer} closed the stream") from None
        with trio.move_on_after(timeout):
            try:
                return await self._recv.receive()
            except trio.EndOfChannel:
                raise self._error or StreamClosed(f"{self._stream.remote_peer} closed the stream") from None
        raise StreamTimeout(f"no frame from {self._stream.remote_peer} in {timeout:g}s")

    def begin(self, request_id: str) -> Exchange:
        """Start an exchange for ``request_id``; call it with no await since its request
        was taken from :meth:`next`. Frames already queued behind that request are the
        exchange's: a ``Cancel`` for it counts, anything else is dropped."""
        exchange = Exchange(request_id)
        while True:
            try:
                msg = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(msg, Cancel) and msg.request_id == request_id:
                exchange.stop(gone=False)
        if self._error is not None:
            exchange.stop(gone=True)
        self._active = exchange
        return exchange

    def end(self) -> None:
        """The exchange's answer is about to go: from here on frames are the next request's."""
        self._active = None
