"""Errors of the federation, as the gateway sees them.

Exception tree::

    FederationError               a federated request could not be served
    ├── NotRoutable               nothing to send it to; nothing was sent
    │   ├── OutboundRefused       our own outbound policy forbids it (never, not listed,
    │   │                         over the price ceiling)                  → HTTP 403
    │   └── NoPeerOffers          no live peer offers this model            → HTTP 404/503
    ├── PeerRefused               the peer's policy refused it (``code``: denied,
    │                             rate_limited, busy, ...; ``retry_after``) → HTTP 403/429/503
    ├── PeerUnreachable           the stream could not be opened, or the peer did not
    │                             answer in time before any output         → HTTP 502/504
    ├── PeerVanished              the stream broke after output had started → error event
    └── PeerFailed                the peer ran it and reported an InferenceError
                                  (``code``, ``retryable``)                 → as a local one

A receipt that fails verification is not an error for the client: it is recorded in the
ledger as flagged (and logged).
"""

from __future__ import annotations


class FederationError(Exception):
    code = "federation_error"

    def __init__(self, message: str, *, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class NotRoutable(FederationError):
    code = "not_routable"


class OutboundRefused(NotRoutable):
    code = "outbound_refused"


class NoPeerOffers(NotRoutable):
    code = "no_peer_offers"


class PeerRefused(FederationError):
    def __init__(self, message: str, *, code: str, peer_id: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, peer_id=peer_id)
        self.code = code
        self.retry_after = retry_after


class PeerUnreachable(FederationError):
    code = "peer_unreachable"


class PeerVanished(FederationError):
    code = "peer_vanished"


class PeerFailed(FederationError):
    def __init__(self, message: str, *, code: str, retryable: bool, peer_id: str | None = None) -> None:
        super().__init__(message, peer_id=peer_id)
        self.code = code
        self.retryable = retryable
