"""The message stream both mesh implementations share: codec + varint framing over a
raw byte pipe, every read and write under a deadline, errors mapped to the mesh tree."""

from __future__ import annotations

import abc
import logging
import math
from typing import Any

import trio

from helexa.protocol import DEFAULT_MAX_FRAME, ProtocolError, decode, encode

from .base import MessageStream, StreamClosed, StreamHandler, StreamTimeout
from .framing import FrameDecoder, encode_frame

log = logging.getLogger(__name__)

CLOSE_GRACE = 2.0
"""How long a graceful close may take before we give up on it (shielded)."""


class FramedStream(MessageStream):
    """Subclasses provide the raw pipe: ``_write_raw``, ``_read_raw`` (``b""`` at end of
    stream), ``_close_raw`` and ``_reset_raw``, raising :class:`StreamClosed` for a broken
    link."""

    def __init__(self, remote_peer: str, *, timeout: float, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.remote_peer = remote_peer
        self._timeout = timeout
        self._max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._send_lock = trio.Lock()
        self._closed = False
        self._reading: trio.CancelScope | None = None

    def interrupt(self) -> None:
        """End a :meth:`receive` waiting now with :class:`StreamTimeout`, as if its deadline
        had passed (nothing if none waits); the stream stays usable."""
        if self._reading is not None:
            self._reading.cancel()

    @abc.abstractmethod
    async def _write_raw(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _read_raw(self) -> bytes: ...

    @abc.abstractmethod
    async def _close_raw(self) -> None: ...

    @abc.abstractmethod
    async def _reset_raw(self) -> None: ...

    async def send(self, *msgs: Any, timeout: float | None = None) -> None:
        data = b"".join(encode_frame(encode(msg)) for msg in msgs)
        # A bare cancel scope, not ``fail_after`` (a generator-based context manager): this
        # runs for every frame on both sides of every federated request.
        with trio.CancelScope(deadline=trio.current_time() + (self._timeout if timeout is None else timeout)) as scope:
            lock = self._send_lock
            try:
                lock.acquire_nowait()  # uncontended, as it nearly always is: no scheduler round trip
            except trio.WouldBlock:
                await lock.acquire()
            try:
                await self._write_raw(data)
            finally:
                lock.release()
        if scope.cancelled_caught:
            await self.reset()
            raise StreamTimeout(f"send to {self.remote_peer} timed out")

    async def receive(self, *, timeout: float | None = None) -> Any:
        try:
            frame = self._decoder.next_frame()  # often there already: sent together with the last
            if frame is None:
                frame = await self._read_frame(self._timeout if timeout is None else timeout)
            return decode(frame, max_size=self._max_frame)
        except ProtocolError:
            await self.reset()
            raise

    def receive_nowait(self) -> Any:
        frame = self._decoder.next_frame()
        if frame is None:
            raise trio.WouldBlock
        return decode(frame, max_size=self._max_frame)

    async def _read_frame(self, timeout: float) -> bytes:
        if timeout == math.inf:  # a reader for the stream's life: no deadline, no scope
            return await self._read_frame_now()
        with trio.CancelScope(deadline=trio.current_time() + timeout) as self._reading:
            return await self._read_frame_now()
        raise StreamTimeout(f"no frame from {self.remote_peer} in time")

    async def _read_frame_now(self) -> bytes:
        while True:
            data = await self._read_raw()
            if not data:
                raise StreamClosed(f"{self.remote_peer} closed the stream")
            self._decoder.feed(data)
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(CLOSE_GRACE) as scope:
            scope.shield = True
            try:
                await self._close_raw()
                return
            except Exception:
                pass
        await self.reset()

    async def reset(self) -> None:
        self._closed = True
        with trio.move_on_after(CLOSE_GRACE) as scope:
            scope.shield = True
            try:
                await self._reset_raw()
            except Exception:
                log.debug("reset of a stream to %s failed", self.remote_peer, exc_info=True)


async def run_handler(handler: StreamHandler, stream: MessageStream, protocol: str) -> None:
    """Run ``handler`` on ``stream`` so that nothing escapes: an exception escaping a
    libp2p stream handler tears the whole host down. Cancellation still propagates."""
    stream.protocol = protocol
    try:
        await handler(stream)
    except BaseException as exc:
        # ExceptionGroups of Cancelled are cancellations too; everything else is swallowed.
        # (``split`` by type: a predicate given to ``subgroup`` is also asked about the
        # group itself, which is never a Cancelled, so a group of cancellations counted
        # as a failure and was logged with a traceback at every shutdown.)
        if isinstance(exc, trio.Cancelled) or (
            isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
        ):
            await stream.reset()
            raise
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if not isinstance(exc, (StreamClosed, StreamTimeout, ProtocolError)):
            log.exception("handler for %s from %s failed", protocol, stream.remote_peer)
        else:
            log.debug("stream %s from %s ended: %s", protocol, stream.remote_peer, exc)
        await stream.reset()
        return
    await stream.aclose()
