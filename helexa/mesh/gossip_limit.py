"""A per-peer rate limit on gossip: how many new messages one neighbour may hand us.

Pure bookkeeping over a time the caller passes in. :class:`~.libp2p_mesh.Libp2pMesh` runs
it first in every topic validator, keyed by the neighbour that forwarded the message (the
one flooding us, whoever signed it): a message over the limit is rejected like an invalid
one, so it is neither delivered nor relayed, and GossipSub's peer score counts it against
that neighbour; once its score falls below the publish threshold, its messages are dropped
before validation, until the score decays back (see ``GOSSIP_SCORE`` there).
"""

from __future__ import annotations

from collections import OrderedDict


class GossipLimiter:
    """A token bucket per peer.

    Args:
        per_second: sustained messages per second a peer may forward.
        burst: messages a quiet peer may forward at once.
        capacity: the most peers remembered (the least recently heard go first).
    """

    def __init__(self, per_second: float, burst: int, capacity: int = 4096) -> None:
        self.rate = per_second
        self.burst = float(burst)
        self.capacity = capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, at)
        self.dropped: dict[str, int] = {}

    def allow(self, peer: str, now: float) -> bool:
        """Take one message from ``peer``; False (and counted in ``dropped``) when it is over."""
        tokens, at = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        else:
            self.dropped[peer] = self.dropped.get(peer, 0) + 1
        self._buckets[peer] = (tokens, now)
        self._buckets.move_to_end(peer)
        if len(self._buckets) > self.capacity:
            gone, _ = self._buckets.popitem(last=False)
            self.dropped.pop(gone, None)
        return ok
