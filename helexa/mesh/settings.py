"""The mesh's tunables, as plain data (the cortex's pydantic config maps onto these)."""

from __future__ import annotations

from dataclasses import dataclass

from helexa.protocol import DEFAULT_MAX_FRAME


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """Settings of a :class:`helexa.mesh.libp2p_mesh.Libp2pMesh`.

    Timeouts are seconds. The GossipSub values are set explicitly because py-libp2p's
    defaults differ from go-libp2p's (a 120 s heartbeat, 10 messages/topic/s).
    """

    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: tuple[str, ...] = ()
    """Multiaddrs ending in ``/p2p/<peer id>``; redialled for as long as we run."""
    dial_timeout: float = 5.0
    stream_timeout: float = 30.0
    """Default deadline of one frame's send or receive on a stream."""
    reconnect_interval: float = 1.0
    """How often the supervisor looks for lost peers and redials them."""
    max_redial_interval: float = 3.0
    """Back-off ceiling between redials of one peer, so a restart is noticed in seconds."""
    forget_after: float = 600.0
    """A non-bootstrap peer unreachable this long is no longer redialled."""
    liveness_interval: float = 1.0
    """How often each connected peer is pinged (libp2p's ``/ipfs/ping/1.0.0``)."""
    liveness_timeout: float = 3.0
    """A peer that does not answer a ping within this is silent (frozen, partitioned):
    its connection is closed, so every stream to it fails at once instead of waiting for
    a stream deadline; the supervisor redials it."""
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    gossip_heartbeat: float = 1.0
    gossip_max_per_topic_per_second: float = 200.0
    gossip_per_peer_per_second: float = 50.0
    """New messages one neighbour may forward us per second, all topics together (an
    announcement per operator every few seconds is far below it); more are rejected and
    score the neighbour down (:mod:`helexa.mesh.gossip_limit`)."""
    gossip_per_peer_burst: int = 200
    max_frame: int = DEFAULT_MAX_FRAME
    mdns: bool = False
    direct: bool = True
    """Serve and use the direct channel (:mod:`.direct_channel`): request streams over a
    plain TCP connection sealed with keys granted through the libp2p connection, instead
    of py-libp2p's yamux and noise; a peer without it is reached over libp2p as before."""
    direct_port: int = 0
    """TCP port of the direct listener, on the libp2p listener's address (0: any free
    one; peers learn it from their ticket)."""
    direct_timeout: float = 2.0
    """How long getting a ticket, connecting and the handshake may take together, on
    either side (capped at half an ``open_stream``'s own deadline), before the stream is
    opened over libp2p instead."""
    direct_retry_after: float = 30.0
    """After a peer's direct channel failed, its streams go over libp2p this long."""
    direct_ticket_ttl: float = 600.0
    direct_max_tickets: int = 1024
    """Tickets a node keeps granted, all peers together (the oldest goes first)."""
