"""An in-process mesh for unit tests: no sockets, no libp2p, but every stream frame goes
through the codec and the varint framing, and gossip goes through the topic validators.

    network = MemoryNetwork()
    a = MemoryMesh(network, "peer-a")
    await nursery.start(a.run)

Gossip is flooded to every running node subscribed to the topic (no relaying topology);
a full subscription queue drops messages, as libp2p does. Cancelling a node's ``run``
(or calling :meth:`MemoryMesh.kill`) resets all its streams: a peer vanishing mid-stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from helexa.protocol import DEFAULT_MAX_FRAME

from .base import (
    DialFailed,
    GossipMessage,
    Mesh,
    MessageStream,
    StreamClosed,
    StreamHandler,
    TopicValidator,
    protocol_choices,
)
from .streams import FramedStream, run_handler

log = logging.getLogger(__name__)

SUBSCRIPTION_QUEUE = 32


class MemoryNetwork:
    """The shared medium the in-memory nodes of one test live on."""

    def __init__(self) -> None:
        self.nodes: dict[str, MemoryMesh] = {}


class _MemoryStream(FramedStream):
    def __init__(
        self,
        remote_peer: str,
        send: trio.MemorySendChannel[bytes],
        recv: trio.MemoryReceiveChannel[bytes],
        *,
        timeout: float,
        max_frame: int,
        on_close: Any = None,
    ) -> None:
        super().__init__(remote_peer, timeout=timeout, max_frame=max_frame)
        self._send = send
        self._recv = recv
        self._on_close = on_close

    async def _write_raw(self, data: bytes) -> None:
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StreamClosed(f"stream to {self.remote_peer} is closed") from None

    async def _read_raw(self) -> bytes:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            return b""
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StreamClosed(f"stream to {self.remote_peer} is closed") from None

    async def _close_raw(self) -> None:
        await self._send.aclose()
        self._forget()

    async def _reset_raw(self) -> None:
        await self._send.aclose()
        await self._recv.aclose()
        self._forget()

    def _forget(self) -> None:
        if self._on_close is not None:
            self._on_close(self)


class MemoryMesh(Mesh):
    """One in-memory node. ``peer_id`` is any unique string."""

    def __init__(self, network: MemoryNetwork, peer_id: str, *, timeout: float = 10.0,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._network = network
        self._peer_id = peer_id
        self._timeout = timeout
        self._max_frame = max_frame
        self._handlers: dict[str, StreamHandler] = {}
        self._subs: dict[str, tuple[trio.MemorySendChannel[GossipMessage], TopicValidator | None]] = {}
        self._streams: set[_MemoryStream] = set()
        self._nursery: trio.Nursery | None = None
        self._cancel: trio.CancelScope | None = None
        self.dropped = 0

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def listen_addrs(self) -> list[str]:
        return [f"/memory/{self._peer_id}/p2p/{self._peer_id}"]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self._peer_id in self._network.nodes:
            raise RuntimeError(f"{self._peer_id} is already running on this network")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._cancel = nursery.cancel_scope
                self._network.nodes[self._peer_id] = self
                task_status.started(self.listen_addrs)
                await trio.sleep_forever()
        finally:
            self._network.nodes.pop(self._peer_id, None)
            self._nursery = None
            for stream in list(self._streams):
                await stream.reset()

    def kill(self) -> None:
        """Stop this node abruptly (its streams are reset)."""
        if self._cancel is not None:
            self._cancel.cancel()

    async def announce(self, topic: str, data: bytes) -> None:
        if self._nursery is None:
            raise RuntimeError("the mesh is not running")
        for node in list(self._network.nodes.values()):
            if node is not self:
                node._deliver(topic, self._peer_id, data)
        await trio.lowlevel.checkpoint()

    def _deliver(self, topic: str, origin: str, data: bytes) -> None:
        sub = self._subs.get(topic)
        if sub is None:
            return
        send, validator = sub
        if validator is not None:
            try:
                ok = validator(origin, data)
            except Exception:
                ok = False
            if not ok:
                return
        try:
            send.send_nowait(GossipMessage(origin, data))
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._subs.pop(topic, None)

    async def subscribe(self, topic: str, validator: TopicValidator | None = None) -> AsyncIterator[GossipMessage]:
        if topic in self._subs:
            raise RuntimeError(f"already subscribed to {topic!r}")
        send, recv = trio.open_memory_channel[GossipMessage](SUBSCRIPTION_QUEUE)
        self._subs[topic] = (send, validator)
        try:
            async with recv:
                async for msg in recv:
                    yield msg
        finally:
            self._subs.pop(topic, None)

    async def open_stream(self, peer_id: str, protocol: str | Sequence[str], *,
                          timeout: float | None = None) -> MessageStream:
        await trio.lowlevel.checkpoint()
        if self._nursery is None:
            raise DialFailed("this node is not running")
        node = self._network.nodes.get(peer_id)
        if node is None or node._nursery is None:
            raise DialFailed(f"{peer_id} is unreachable")
        choices = protocol_choices(protocol)
        protocol = next((p for p in choices if p in node._handlers), "")
        if not protocol:
            raise DialFailed(f"{peer_id} does not serve {' or '.join(choices)}")
        handler = node._handlers[protocol]
        a_send, b_recv = trio.open_memory_channel[bytes](math.inf)
        b_send, a_recv = trio.open_memory_channel[bytes](math.inf)
        ours = _MemoryStream(peer_id, a_send, a_recv, timeout=self._timeout, max_frame=self._max_frame,
                             on_close=self._streams.discard)
        theirs = _MemoryStream(self._peer_id, b_send, b_recv, timeout=node._timeout, max_frame=node._max_frame,
                               on_close=node._streams.discard)
        ours.protocol = theirs.protocol = protocol
        self._streams.add(ours)
        node._streams.add(theirs)
        node._nursery.start_soon(run_handler, handler, theirs, protocol)
        return ours

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    def peers(self) -> list[str]:
        if self._nursery is None:
            return []
        return [p for p in self._network.nodes if p != self._peer_id]

    async def connect(self, multiaddr: str, *, timeout: float | None = None) -> str:
        await trio.lowlevel.checkpoint()
        peer = multiaddr.rsplit("/p2p/", 1)[-1]
        if peer not in self._network.nodes:
            raise DialFailed(f"{multiaddr} is unreachable")
        return peer

    def add_addrs(self, peer_id: str, addrs: list[str]) -> None:
        pass
