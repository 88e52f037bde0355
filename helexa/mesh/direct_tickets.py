"""Tickets for the direct channel, sans-IO: what a peer is granted over libp2p, and the
book the granting node keeps.

A dialer asks over a libp2p stream (``/helexa/direct/1``), whose noise session has
already authenticated both ends and keeps the answer confidential. The granting node
answers with a :class:`Grant`: the TCP port of its direct listener, a ticket id and a
fresh random secret, bound in its :class:`TicketBook` to the peer id that asked. A TCP
connection that names the ticket id proves it holds the secret only by deriving the
right keys from it (:mod:`.direct_session`), so a ticket id seen on the wire is worth
nothing without the secret.

Wire (both fixed-size)::

    request:  b"HXT1"
    grant:    b"HXG1" | port (u16) | ttl seconds (u32) | max uses (u32) | ticket id (16) | secret (32)
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from helexa.protocol import DecodeError

TICKET_REQUEST = b"HXT1"
_GRANT_MAGIC = b"HXG1"
_GRANT = struct.Struct("!4sHII16s32s")
GRANT_SIZE = _GRANT.size
TICKET_ID_SIZE = 16
SECRET_SIZE = 32
RECENT_NONCES = 64
"""Dialer nonces remembered per ticket. Older replays are refused too, one step later:
the listener's own fresh nonce gives a replayed connection other keys, so its first
record does not open (:mod:`.direct_session`). The bound keeps a ticket's memory small
whatever its uses."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What the dialer holds: where to connect and what to prove there."""

    port: int
    ttl: int
    """Seconds the ticket is valid from its issue."""
    max_uses: int
    """Connections the ticket opens at most (the dialer asks for a new one before)."""
    ticket_id: bytes
    secret: bytes = field(repr=False)

    def encode(self) -> bytes:
        return _GRANT.pack(_GRANT_MAGIC, self.port, self.ttl, self.max_uses, self.ticket_id, self.secret)

    @classmethod
    def decode(cls, data: bytes) -> "Grant":
        """Raises:
            DecodeError: not exactly one grant."""
        if len(data) != GRANT_SIZE:
            raise DecodeError(f"a direct-channel grant is {GRANT_SIZE} bytes, not {len(data)}")
        magic, port, ttl, max_uses, ticket_id, secret = _GRANT.unpack(data)
        if magic != _GRANT_MAGIC or not port or not ttl or not max_uses:
            raise DecodeError("not a direct-channel grant")
        return cls(port, ttl, max_uses, ticket_id, secret)


@dataclass(slots=True)
class _Ticket:
    peer: str
    secret: bytes
    expires: float
    uses_left: int
    nonces: deque[bytes]


class TicketBook:
    """The tickets a node has granted, bounded and expiring.

    Args:
        port: the direct listener's port, put in every grant.
        ttl: seconds a ticket may open connections.
        max_tickets: tickets kept in all (the oldest is dropped for a new one).
        per_peer: tickets kept per peer (a peer's oldest is dropped for its new one).
        max_uses: connections one ticket may open.
    """

    def __init__(self, port: int, *, ttl: float, max_tickets: int, per_peer: int = 4, max_uses: int = 4096) -> None:
        self.port = port
        self._ttl = max(1, int(ttl))
        self._max = max(1, max_tickets)
        self._per_peer = max(1, per_peer)
        self._max_uses = max(1, max_uses)
        self._tickets: OrderedDict[bytes, _Ticket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, peer: str, now: float) -> Grant:
        """A new ticket for ``peer``, valid from ``now``."""
        self._expire(now)
        mine = [tid for tid, t in self._tickets.items() if t.peer == peer]
        for tid in mine[: max(0, len(mine) - self._per_peer + 1)]:
            del self._tickets[tid]
        while len(self._tickets) >= self._max:
            self._tickets.popitem(last=False)
        ticket_id, secret = os.urandom(TICKET_ID_SIZE), os.urandom(SECRET_SIZE)
        self._tickets[ticket_id] = _Ticket(peer, secret, now + self._ttl, self._max_uses,
                                           deque(maxlen=RECENT_NONCES))
        return Grant(self.port, self._ttl, self._max_uses, ticket_id, secret)

    def redeem(self, ticket_id: bytes, nonce: bytes, now: float) -> tuple[str, bytes] | None:
        """``(peer, secret)`` of a live ticket for one new connection whose dialer sent
        ``nonce``; ``None`` for an unknown, expired or used-up ticket or a nonce this
        ticket has seen among its last :data:`RECENT_NONCES` (a replayed hello)."""
        ticket = self._tickets.get(ticket_id)
        if ticket is None:
            return None
        if now >= ticket.expires or ticket.uses_left <= 0:
            del self._tickets[ticket_id]
            return None
        if nonce in ticket.nonces:
            return None
        ticket.nonces.append(nonce)
        ticket.uses_left -= 1
        return ticket.peer, ticket.secret

    def _expire(self, now: float) -> None:
        for tid in [tid for tid, t in self._tickets.items() if now >= t.expires]:
            del self._tickets[tid]
