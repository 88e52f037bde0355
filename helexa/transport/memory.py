"""An in-memory channel pair for unit tests. Every message is still encoded and decoded
through the protocol codec, so these tests exercise the wire format too."""

from __future__ import annotations

import math
from typing import Any

import trio

from helexa.protocol import DEFAULT_MAX_FRAME, Fault, ProtocolError, decode, encode

from .channel import Channel, ChannelClosed


class MemoryChannel(Channel):
    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        *,
        remote: str,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self._send = send
        self._receive = receive
        self._max_frame = max_frame
        self.remote = remote

    async def send(self, msg: Any, *, timeout: float | None = None) -> None:
        # The buffer is unbounded: a send never waits, so ``timeout`` never applies.
        await self.send_raw(encode(msg))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests use it to inject malformed frames)."""
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ChannelClosed("peer closed") from None

    async def receive(self) -> Any:
        try:
            data = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ChannelClosed("peer closed") from None
        try:
            return decode(data, max_size=self._max_frame)
        except ProtocolError as exc:
            try:
                await self.send(Fault(exc.code, str(exc)))
            except ChannelClosed:
                pass
            await self.aclose()
            raise

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self._send.aclose()
        await self._receive.aclose()


def channel_pair(max_frame: int = DEFAULT_MAX_FRAME) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected channels (``a`` talks to ``b``)."""
    a_send, b_recv = trio.open_memory_channel[bytes](math.inf)
    b_send, a_recv = trio.open_memory_channel[bytes](math.inf)
    return (
        MemoryChannel(a_send, a_recv, remote="memory:b", max_frame=max_frame),
        MemoryChannel(b_send, b_recv, remote="memory:a", max_frame=max_frame),
    )
