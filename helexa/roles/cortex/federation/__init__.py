"""Federation: serving other operators' cortex nodes over the mesh, and asking them.

Modules: :mod:`.policy` (pure policy decisions), :mod:`.announcements` (the pure peer
table), :mod:`.receipts` (signing and verifying usage receipts), :mod:`.ledger` (the
durable SQLite ledger), :mod:`.service` (the :class:`Federation` service). The exception
tree is drawn in :mod:`.errors`.
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
