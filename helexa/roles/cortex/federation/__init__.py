"""Federation: serving other operators' cortex nodes over the mesh, and asking them.

Modules: :mod:`.policy` (pure policy decisions), :mod:`.announcements` (the pure peer
table), :mod:`.receipts` (signing and verifying usage receipts), :mod:`.ledger` (the
durable SQLite ledger), :mod:`.service` (the :class:`Federation` service).

Exception tree (defined in :mod:`.errors`, where each maps to an HTTP status)::

    FederationError
    ├── NotRoutable
    │   ├── OutboundRefused       our outbound policy forbids it; nothing was sent
    │   └── NoPeerOffers          no live peer offers the model; nothing was sent
    ├── PeerRefused               the peer's policy said no (.code, .retry_after)
    ├── PeerUnreachable           no stream, or no answer before any output
    ├── PeerVanished              the stream broke mid-answer
    └── PeerFailed                the peer reported an InferenceError (.code, .retryable)
"""

from .errors import (
    FederationError,
    NoPeerOffers,
    NotRoutable,
    OutboundRefused,
    PeerFailed,
    PeerRefused,
    PeerUnreachable,
    PeerVanished,
)
from .policy import AskPolicy, Outbound, ServePolicy

__all__ = [
    "AskPolicy",
    "FederationError",
    "NoPeerOffers",
    "NotRoutable",
    "Outbound",
    "OutboundRefused",
    "PeerFailed",
    "PeerRefused",
    "PeerUnreachable",
    "PeerVanished",
    "ServePolicy",
]
