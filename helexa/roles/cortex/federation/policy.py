"""Federation policy, as pure decisions over plain data.

Serving side: :class:`ServePolicy` (whom to serve, what, how fast) and
:class:`Admission` (per-peer token buckets and concurrency, given a clock reading).
Asking side: :class:`AskPolicy` (whether and where requests may go out).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from helexa.protocol.federation import OfferedModel, PolicySummary


@dataclass(frozen=True, slots=True)
class ServePolicy:
    """Whom this cortex serves, and how much.

    An allow list, when non-empty, admits only the peers or operators on it; the deny
    lists are applied first. ``models`` limits what is offered (``None``: everything the
    local fleet offers).
    """

    serve_peers: bool = True
    allow_peers: frozenset[str] = frozenset()
    allow_operators: frozenset[str] = frozenset()
    deny_peers: frozenset[str] = frozenset()
    deny_operators: frozenset[str] = frozenset()
    rate_per_second: float = 5.0
    """Sustained requests per second per peer (a token bucket)."""
    burst: int = 10
    max_concurrent_per_peer: int = 4
    models: frozenset[str] | None = None

    def permits(self, peer_id: str, operator: str) -> bool:
        if not self.serve_peers:
            return False
        if peer_id in self.deny_peers or operator in self.deny_operators:
            return False
        if self.allow_peers or self.allow_operators:
            return peer_id in self.allow_peers or operator in self.allow_operators
        return True

    def offers(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def filter_offer(self, offer: list[OfferedModel]) -> tuple[OfferedModel, ...]:
        if not self.serve_peers:
            return ()
        return tuple(m for m in offer if self.offers(m.model_id))

    def summary(self) -> PolicySummary:
        return PolicySummary(
            serves_peers=self.serve_peers,
            open_to_all=not (self.allow_peers or self.allow_operators),
            rate_per_minute=self.rate_per_second * 60,
            max_concurrent=self.max_concurrent_per_peer,
        )


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` stored; pure given ``now``."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        """Refilled to ``burst``: as a new bucket would be."""
        self._refill(now)
        return self.tokens >= self.burst

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available."""
        self._refill(now)
        if self.tokens >= 1.0 or self.rate <= 0:
            return 0.0 if self.tokens >= 1.0 else float("inf")
        return (1.0 - self.tokens) / self.rate


_BUCKETS_KEPT = 1024
"""Peers' rate buckets kept before the full ones are forgotten."""


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    code: str = "ok"
    reason: str = ""
    retry_after: float | None = None


class Admission:
    """Admits or refuses inbound federated requests under a :class:`ServePolicy`.

    Call :meth:`admit` when a request arrives and, if admitted, :meth:`release` exactly
    once when it ends.
    """

    def __init__(self, policy: ServePolicy) -> None:
        self.policy = policy
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = _BUCKETS_KEPT
        self.in_flight: dict[str, int] = {}

    def set_policy(self, policy: ServePolicy) -> None:
        """A new policy (a live reload): requests in flight keep their slots; rate
        buckets start afresh at the new rate."""
        if policy != self.policy:
            self.policy = policy
            self._buckets.clear()

    def admit(self, peer_id: str, operator: str, model_id: str, now: float) -> Decision:
        p = self.policy
        if not p.serve_peers:
            return Decision(False, "not_serving", "this cortex does not serve peers")
        if not p.permits(peer_id, operator):
            return Decision(False, "denied", f"peer {peer_id} (operator {operator!r}) is not allowed")
        if not p.offers(model_id):
            return Decision(False, "model_not_offered", f"model {model_id!r} is not offered to peers")
        if self.in_flight.get(peer_id, 0) >= p.max_concurrent_per_peer:
            return Decision(False, "busy", f"at most {p.max_concurrent_per_peer} concurrent requests per peer",
                            retry_after=1.0)
        bucket = self._buckets.get(peer_id)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            bucket = self._buckets[peer_id] = TokenBucket(p.rate_per_second, p.burst, now)
        if not bucket.take(now):
            return Decision(False, "rate_limited", f"more than {p.rate_per_second:g} requests/s",
                            retry_after=bucket.wait_time(now))
        self.in_flight[peer_id] = self.in_flight.get(peer_id, 0) + 1
        return Decision(True)

    def _prune(self, now: float) -> None:
        """Forget the buckets that refilled (a full bucket is a new one): peer ids cost
        nothing to make, and each one that ever asked kept its bucket, for good."""
        for peer_id in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[peer_id]
        self._prune_at = max(_BUCKETS_KEPT, 2 * len(self._buckets))  # amortised: not a scan per request

    def release(self, peer_id: str) -> None:
        n = self.in_flight.get(peer_id, 0) - 1
        if n > 0:
            self.in_flight[peer_id] = n
        else:
            self.in_flight.pop(peer_id, None)


class Outbound(enum.Enum):
    NEVER = "never"
    LISTED = "listed"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class AskPolicy:
    """Whether and where this cortex may send requests out.

    ``LISTED`` sends only to ``peers`` or ``operators``; a price ceiling (per million
    tokens) excludes any peer pricing above it.
    """

    outbound: Outbound = Outbound.ANY
    peers: frozenset[str] = frozenset()
    operators: frozenset[str] = frozenset()
    max_price_input: float | None = None
    max_price_output: float | None = None

    def allows_peer(self, peer_id: str, operator: str) -> bool:
        if self.outbound is Outbound.NEVER:
            return False
        if self.outbound is Outbound.LISTED:
            return peer_id in self.peers or operator in self.operators
        return True

    def allows_price(self, model: OfferedModel) -> bool:
        if self.max_price_input is not None and model.price_input > self.max_price_input:
            return False
        if self.max_price_output is not None and model.price_output > self.max_price_output:
            return False
        return True
