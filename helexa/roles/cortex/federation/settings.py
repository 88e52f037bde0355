"""What an operator sets for the federation (``[mesh]`` in ``cortex.toml``): how often the
cortex announces its offer and for how long peers keep it, how many peers a request tries,
the serving and asking sides' deadlines, the streams kept open per peer, and how long a
model only peers served stays "temporarily unavailable" once its offer expired."""

from __future__ import annotations

from dataclasses import dataclass, field

from .inbound import ServeTimeouts
from .outbound import AskTimeouts


@dataclass(frozen=True, slots=True)
class FederationSettings:
    announce_interval: float = 5.0
    announcement_ttl: float = 30.0
    """Peers forget our offer this long after our last announcement."""
    max_attempts: int = 3
    """Peers tried in turn when one is unreachable or busy, before any output."""
    serve: ServeTimeouts = field(default_factory=ServeTimeouts)
    ask: AskTimeouts = field(default_factory=AskTimeouts)
    idle_streams: int = 8
    """Streams kept open to each peer between requests, for the next ones (0: a new
    stream per request). Opening a libp2p stream costs ~10 ms; a reused one does not."""
    stream_max_idle: float = 30.0
    """An idle stream older than this is closed rather than reused (under the serving
    side's ``ServeTimeouts.idle``, so that a reused stream is rarely one it just closed)."""
    unavailable_grace: float | None = None
    """Seconds after the last offer of a model only peers serve expired during which a
    request for it is answered 503 (temporarily unavailable, Retry-After) rather than 404
    (unknown): a partition, a peer restarting. None: six announcement periods."""

    @property
    def grace(self) -> float:
        return 6 * self.announce_interval if self.unavailable_grace is None else self.unavailable_grace
