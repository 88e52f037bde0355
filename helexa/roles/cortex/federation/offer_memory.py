"""Which models peers offered lately, after their offers expired (pure).

A model only peers serve is unknown here once its last offer expires: during a partition
from the peer that served it, a client using it would get ``404 model_not_found``, which
tells an SDK (and a user) that the name is wrong, and is not retried. For ``grace`` seconds
after the last offer of a model expired it is remembered instead, and the gateway answers
``503`` with Retry-After ("temporarily unavailable"); then it is forgotten, and unknown.

A model a peer withdrew (its next announcement no longer offers it: unloaded, a policy
change) is not remembered for that peer: that is no partition. But a peer that still
serves peers and now offers nothing at all has lost its capacity, not changed its mind (its
neurons are gone, or not back yet after it restarted: a cortex announces as it starts,
before its neurons rejoin): its offers are remembered as if they expired then
(:meth:`OfferMemory.lapsed`). Memory is bounded: entries
older than the grace are dropped as time passes, and at most ``capacity`` models are held
(the ones whose offers expired longest ago go first).

Each remembered offer keeps the operator and prices it was made with, so that the grace is
given only where the ask policy would have sent the request (:meth:`OfferMemory.lately`):
a model only peers our policy excludes offered stays refused (403) through the grace, as
it was while they announced it, instead of turning "temporarily unavailable".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from helexa.protocol.federation import OfferedModel

DEFAULT_CAPACITY = 4096
"""Models remembered at most (an announcement offers at most 256)."""


class RecentOffer(NamedTuple):
    """One peer's last offer of one model, and when it expires."""

    until: float
    operator: str
    model: OfferedModel


class OfferMemory:
    """When each peer's offer of each model expires, kept ``grace`` seconds past it."""

    def __init__(self, grace: float, capacity: int = DEFAULT_CAPACITY) -> None:
        self.grace = grace
        self.capacity = capacity
        self._until: OrderedDict[str, dict[str, RecentOffer]] = OrderedDict()  # model -> peer -> its offer

    def offered(self, peer_id: str, models: Iterable[OfferedModel], expires_at: float, withdrawn: Iterable[str] = (),
                *, operator: str = "") -> None:
        """``peer_id`` (of ``operator``) announced ``models``, its offer good until
        ``expires_at``; it no longer offers ``withdrawn`` (they were in its announcement
        before)."""
        for model_id in withdrawn:
            peers = self._until.get(model_id)
            if peers is not None:
                peers.pop(peer_id, None)
                if not peers:
                    del self._until[model_id]
        for model in models:
            peers = self._until.setdefault(model.model_id, {})
            before = peers.get(peer_id)
            peers[peer_id] = RecentOffer(max(expires_at, before.until if before else expires_at), operator, model)
            self._until.move_to_end(model.model_id)
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def lapsed(self, peer_id: str, model_ids: Iterable[str], now: float) -> None:
        """``peer_id``'s offers of ``model_ids`` ended ``now`` (its capacity went to zero):
        remembered as offers that expired now, for the grace."""
        for model_id in model_ids:
            peers = self._until.get(model_id)
            offer = peers.get(peer_id) if peers is not None else None
            if offer is not None:
                peers[peer_id] = offer._replace(until=min(offer.until, now))

    def unavailable(self, model_id: str, now: float) -> bool:
        """Whether some peer's offer of ``model_id`` expired less than ``grace`` ago (the
        caller knows no live offer of it)."""
        return bool(self.lately(model_id, now))

    def lately(self, model_id: str, now: float) -> list[tuple[str, RecentOffer]]:
        """``(peer id, offer)`` of each peer whose offer of ``model_id`` expired less than
        ``grace`` ago."""
        peers = self._until.get(model_id)
        if peers is None:
            return []
        return [(p, o) for p, o in peers.items() if o.until <= now < o.until + self.grace]

    def forget(self, now: float) -> None:
        """Drop what expired ``grace`` or more ago."""
        for model_id, peers in list(self._until.items()):
            for peer_id in [p for p, o in peers.items() if o.until + self.grace <= now]:
                del peers[peer_id]
            if not peers:
                del self._until[model_id]

    def __len__(self) -> int:
        return len(self._until)
