"""The mesh interface: what the rest of helexa sees of the libp2p network.

Two implementations: :class:`helexa.mesh.libp2p_mesh.Libp2pMesh` (real hosts) and
:class:`helexa.mesh.memory.MemoryMesh` (one process, for unit tests; every frame still goes
through the codec and the varint framing). Nothing outside :mod:`helexa.mesh` imports
libp2p or sees its types: peers are base58 peer id strings, addresses are multiaddr
strings, stream payloads are :mod:`helexa.protocol` messages.

Exception tree::

    MeshError                 anything the mesh could not do
    ├── DialFailed            the peer could not be reached or the stream not opened
    │                         (unknown addresses, refused, protocol unsupported, timeout)
    ├── StreamClosed          the peer closed or reset the stream, or its connection broke
    │                         (a peer killed mid-stream shows up here)
    └── StreamTimeout         a send or receive did not complete within its deadline

A malformed frame surfaces as :class:`helexa.protocol.ProtocolError`; the stream has then
already been reset.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

TopicValidator = Callable[[str, bytes], bool]
"""``validator(origin_peer_id, data) -> accept``. Runs before a message is delivered or
relayed: a rejected message is dropped and never forwarded to other peers. It must be
fast, pure and must not raise (an exception counts as a rejection)."""

StreamHandler = Callable[["MessageStream"], Awaitable[None]]
"""Serves one inbound stream. The mesh closes (or, if it raised, resets) the stream after
the handler returns; an exception never escapes into the network layer."""


class MeshError(Exception):
    pass


class DialFailed(MeshError):
    pass


class StreamClosed(MeshError):
    pass


class StreamTimeout(MeshError):
    pass


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """One validated message from a topic. ``origin`` is the signing author (not the
    neighbour that relayed it)."""

    origin: str
    data: bytes


class MessageStream(abc.ABC):
    """A bidirectional stream of protocol messages to one peer.

    Each frame is one :func:`helexa.protocol.encode`d message, prefixed with its varint
    length. ``send`` may be called from one task while another ``receive``s. Every call
    has a deadline: ``timeout`` or the stream's default.
    """

    remote_peer: str
    """The authenticated peer id at the other end."""

    protocol: str = ""
    """The protocol the stream speaks: the one it was opened for, or the first of the
    opener's choices that the peer serves (:meth:`Mesh.open_stream`)."""

    @abc.abstractmethod
    async def send(self, *msgs: Any, timeout: float | None = None) -> None:
        """Encode and send ``msgs`` (one or more), in order and in one write: messages that
        are ready together cross the mesh as one muxer frame (on libp2p each write costs a
        frame, an encryption and a syscall here and a wake-up at the peer).

        Raises:
            StreamClosed: the peer closed/reset the stream or the connection broke.
            StreamTimeout: the write did not finish in time.
        """

    @abc.abstractmethod
    async def receive(self, *, timeout: float | None = None) -> Any:
        """Receive and decode the next message.

        Raises:
            StreamClosed: the peer closed (end of stream) or reset it, or the link broke.
            StreamTimeout: no complete frame arrived in time.
            ProtocolError: the peer sent a malformed or oversized frame (stream reset).
        """

    def receive_nowait(self) -> Any:
        """The next message if a whole frame of it is here already, without waiting (and
        without a checkpoint: nothing to cancel).

        Raises:
            trio.WouldBlock: none is (this default: a stream that buffers nothing).
            ProtocolError: the buffered frame is malformed (close or reset the stream).
        """
        raise trio.WouldBlock

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close our side gracefully (bounded by a short shielded deadline); idempotent;
        never raises."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Abort the stream in both directions; idempotent; never raises."""


class Mesh(abc.ABC):
    """One node of the mesh.

    Lifecycle: construct, then ``await nursery.start(mesh.run)`` which returns the bound
    listen addresses; the methods below are usable once ``run`` has started and until it
    is cancelled.
    """

    @property
    @abc.abstractmethod
    def peer_id(self) -> str:
        """This node's peer id (base58)."""

    @property
    @abc.abstractmethod
    def listen_addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in ``/p2p/<peer id>``."""

    @abc.abstractmethod
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled; ``started(listen_addrs)`` once it is usable."""

    @abc.abstractmethod
    async def announce(self, topic: str, data: bytes) -> None:
        """Publish ``data`` (signed by this node) on ``topic``. Best effort: gossip is
        lossy, so anything that must arrive is repeated or sent over a stream."""

    @abc.abstractmethod
    def subscribe(
        self, topic: str, validator: TopicValidator | None = None
    ) -> AsyncIterator[GossipMessage]:
        """An async iterator of validated messages on ``topic``, ours excluded.

        Use as ``async with aclosing(mesh.subscribe(t, v)) as messages``; one subscriber
        per topic. ``validator`` also decides whether this node relays a message.
        """

    @abc.abstractmethod
    async def open_stream(self, peer_id: str, protocol: str | Sequence[str], *,
                          timeout: float | None = None) -> MessageStream:
        """Open a stream to ``peer_id`` speaking ``protocol`` (dialing if needed), or the
        first of several (newest first) that the peer serves: the stream's ``protocol``
        says which (how a newer protocol is negotiated with a peer of an older release).

        Raises:
            DialFailed: unreachable, unknown addresses, no protocol served, or timeout.
        """

    @abc.abstractmethod
    def serve(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams of ``protocol`` with ``handler`` (one task per stream)."""

    @abc.abstractmethod
    def peers(self) -> list[str]:
        """Peer ids currently connected."""

    @abc.abstractmethod
    async def connect(self, multiaddr: str, *, timeout: float | None = None) -> str:
        """Dial ``multiaddr`` (which must end in ``/p2p/<peer id>``), remember it for the
        reconnect supervisor, and return the peer id.

        Raises:
            DialFailed: the address is invalid or the dial failed or timed out.
        """

    @abc.abstractmethod
    def add_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Learn addresses of ``peer_id`` (from an announcement, say) without dialing."""


def protocol_choices(protocol: str | Sequence[str]) -> tuple[str, ...]:
    """:meth:`Mesh.open_stream`'s ``protocol`` as a non-empty tuple, first choice first."""
    choices = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    if not choices:
        raise DialFailed("no protocol to open")
    return choices
